//! `open_file_range`, the view node's playback path: a batch in the page
//! cache is read and opened on the async worker, the rest through the
//! blocking read; either way the bytes must equal the plaintext, only
//! touched segments may be read, and damage or truncation must end the
//! stream with its error and no bytes of the bad batch.

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use shared::{
    open_file_range, seal_all, DataKey, Opener, ReadAt, SealError, SealedLayout, HEADER_LEN,
    READ_AHEAD_BYTES,
};

const ASSET: &str = "file-range";

fn key() -> DataKey {
    DataKey::from_bytes([0x24; 32])
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 % 253) as u8).collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    Cached(Range<u64>),
    Blocking(Range<u64>),
}

/// A sealed blob in memory of which only the first `cached` bytes are "in
/// the page cache"; records every read.
struct MemFile {
    bytes: Vec<u8>,
    cached: usize,
    reads: Mutex<Vec<Read>>,
}

impl MemFile {
    fn new(bytes: Vec<u8>, cached: usize) -> Arc<MemFile> {
        Arc::new(MemFile {
            bytes,
            cached,
            reads: Mutex::new(Vec::new()),
        })
    }

    fn reads(&self) -> Vec<Read> {
        self.reads.lock().unwrap().clone()
    }
}

impl ReadAt for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let at = offset as usize;
        self.reads
            .lock()
            .unwrap()
            .push(Read::Blocking(offset..offset + buf.len() as u64));
        let src = self
            .bytes
            .get(at..at + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> usize {
        let at = offset as usize;
        let n = buf
            .len()
            .min(self.cached.min(self.bytes.len()).saturating_sub(at));
        buf[..n].copy_from_slice(&self.bytes[at..at + n]);
        self.reads
            .lock()
            .unwrap()
            .push(Read::Cached(offset..offset + n as u64));
        n
    }
}

fn opener(sealed: &[u8], len: u64) -> Opener {
    Opener::new(&key(), ASSET, &sealed[..HEADER_LEN], len).unwrap()
}

/// The bytes until the first error, and that error.
async fn drain(
    stream: impl Stream<Item = Result<Bytes, SealError>>,
) -> (Vec<u8>, Option<SealError>) {
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

async fn read<F: ReadAt>(file: Arc<F>, sealed: &[u8], want: Range<u64>) -> Vec<u8> {
    let o = opener(sealed, sealed.len() as u64);
    let (bytes, err) = drain(open_file_range(file, o, want.start, want.end).unwrap()).await;
    assert_eq!(err, None, "range {want:?}");
    bytes
}

#[tokio::test]
async fn every_range_is_the_plaintext_whether_cached_cold_or_half_cached() {
    for seg in [16u32, 4096] {
        let plain = data(3 * READ_AHEAD_BYTES as usize + 5000);
        let (sealed, _) = seal_all(&key(), ASSET, 1, seg, &plain);
        let n = plain.len() as u64;
        let s = u64::from(seg);
        let ranges = [
            0..n,
            0..1,
            n - 1..n,
            5..5,
            s - 1..s + 1,
            READ_AHEAD_BYTES - 3..2 * READ_AHEAD_BYTES + 7,
            n / 3..n / 3 + n / 2,
        ];
        // Warm, cold, and a page-cache edge inside the second batch.
        for cached in [sealed.len(), 0, sealed.len() / 2 + 12_345] {
            for want in ranges.clone() {
                let file = MemFile::new(sealed.clone(), cached);
                let got = read(file.clone(), &sealed, want.clone()).await;
                assert!(
                    got == plain[want.start as usize..want.end as usize],
                    "seg {seg}, cached {cached}, range {want:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn reads_whole_touched_segments_once_and_waits_only_for_what_is_not_cached() {
    let seg = 4096u32;
    let plain = data(4 * READ_AHEAD_BYTES as usize);
    let (sealed, _) = seal_all(&key(), ASSET, 1, seg, &plain);
    let layout = SealedLayout::new(seg, sealed.len() as u64).unwrap();
    let want = 100_000..700_000u64;
    let touched = layout.segments_for(want.start, want.end);
    let span = layout.sealed_range(touched.start).start..layout.sealed_range(touched.end - 1).end;

    // All cached: no blocking read at all, batches cover exactly `span`.
    let warm = MemFile::new(sealed.clone(), sealed.len());
    read(warm.clone(), &sealed, want.clone()).await;
    assert_eq!(
        warm.reads()[0],
        Read::Cached(layout.sealed_range(touched.start)),
        "the first batch is one segment, so the first bytes leave early"
    );
    let mut at = span.start;
    for r in warm.reads() {
        let Read::Cached(r) = r else {
            panic!("blocking read with everything cached: {r:?}")
        };
        assert_eq!(r.start, at, "batches are consecutive, nothing re-read");
        assert!(r.end - r.start <= READ_AHEAD_BYTES + READ_AHEAD_BYTES / u64::from(seg) * 16);
        at = r.end;
    }
    assert_eq!(at, span.end, "nothing past the last touched segment");

    // Cache ends mid-range: the blocking read starts exactly where the
    // cached part stopped, and nothing is read twice.
    let edge = (span.start + span.end) / 2 + 777;
    let half = MemFile::new(sealed.clone(), edge as usize);
    read(half.clone(), &sealed, want.clone()).await;
    let mut covered = Vec::new();
    for r in half.reads() {
        match &r {
            Read::Cached(r) => assert!(r.is_empty() || r.end <= edge, "{r:?}"),
            Read::Blocking(r) => assert!(r.start >= edge, "{r:?}"),
        }
        let (Read::Cached(r) | Read::Blocking(r)) = r;
        if r.start < r.end {
            covered.push(r);
        }
    }
    covered.sort_by_key(|r| r.start);
    let mut at = span.start;
    for r in covered {
        assert_eq!(r.start, at, "gap or overlap");
        at = r.end;
    }
    assert_eq!(at, span.end);
}

/// `got` is the plaintext up to the start of a batch: none of the bytes
/// from `bad` on (where the damage is), and at most one batch short of it.
fn ends_before_the_bad_batch(got: &[u8], plain: &[u8], bad: u64) {
    assert!(got == &plain[..got.len()], "not the plaintext");
    let n = got.len() as u64;
    assert!(n <= bad, "{n} bytes served, damage at {bad}");
    assert!(
        n + READ_AHEAD_BYTES >= bad,
        "{n} bytes served, damage at {bad}: a whole batch withheld"
    );
}

#[tokio::test]
async fn damage_ends_the_stream_with_its_error_and_no_bytes_of_that_batch() {
    let seg = 4096u32;
    let plain = data(3 * READ_AHEAD_BYTES as usize);
    let (sealed, _) = seal_all(&key(), ASSET, 1, seg, &plain);
    let layout = SealedLayout::new(seg, sealed.len() as u64).unwrap();
    let per_batch = READ_AHEAD_BYTES / u64::from(seg);
    // A segment in the second batch, zeroed (the failure scrubbing hunts).
    let bad = per_batch + 3;
    let r = layout.sealed_range(bad);
    let mut zeroed = sealed.clone();
    zeroed[r.start as usize..r.end as usize].fill(0);
    for cached in [zeroed.len(), 0] {
        let file = MemFile::new(zeroed.clone(), cached);
        let o = opener(&zeroed, zeroed.len() as u64);
        let (bytes, err) =
            drain(open_file_range(file, o, 0, layout.plaintext_len()).unwrap()).await;
        assert_eq!(err, Some(SealError::SegmentAuth { index: bad }));
        ends_before_the_bad_batch(&bytes, &plain, bad * u64::from(seg));
    }

    // The file is shorter than the length the opener was built for (cut
    // while the node runs): `Truncated` from the batch that runs short.
    let cut = sealed[..sealed.len() - 1000].to_vec();
    for cached in [cut.len(), 0] {
        let file = MemFile::new(cut.clone(), cached);
        let o = opener(&sealed, sealed.len() as u64);
        let (bytes, err) =
            drain(open_file_range(file, o, 0, layout.plaintext_len()).unwrap()).await;
        assert_eq!(err, Some(SealError::Truncated), "cached {cached}");
        ends_before_the_bad_batch(
            &bytes,
            &plain,
            layout.plain_offset(layout.segment_count() - 1),
        );
    }

    let o = opener(&sealed, sealed.len() as u64);
    let file = MemFile::new(sealed.clone(), 0);
    assert!(matches!(
        open_file_range(file.clone(), o.clone(), 0, layout.plaintext_len() + 1),
        Err(SealError::RangeOutOfBounds)
    ));
    assert!(matches!(
        open_file_range(file, o, 10, 9),
        Err(SealError::RangeOutOfBounds)
    ));
}

/// The real thing: a file on disk, read with `preadv2(RWF_NOWAIT)` while
/// it is in the page cache.
#[tokio::test]
async fn a_real_file_reads_from_the_page_cache_and_survives_truncation() {
    let plain = data(2 * READ_AHEAD_BYTES as usize + 999);
    let (sealed, _) = seal_all(&key(), ASSET, 1, 65536, &plain);
    let path = std::env::temp_dir().join(format!(
        "slmedia-file-range-{}-{}",
        std::process::id(),
        shared::runtime::unix_now()
    ));
    std::fs::write(&path, &sealed).unwrap();
    let file = Arc::new(std::fs::File::open(&path).unwrap());

    // Just written, so cached: the non-blocking read gets all of it.
    let mut buf = vec![0; 200_000];
    assert_eq!(
        file.read_cached_at(&mut buf, 1234),
        buf.len(),
        "RWF_NOWAIT read of a cached file came up short: the fast path is off"
    );
    assert_eq!(buf, sealed[1234..1234 + buf.len()]);
    // Past the end: nothing, not an error.
    assert_eq!(file.read_cached_at(&mut buf, sealed.len() as u64), 0);

    let n = plain.len() as u64;
    for want in [0..n, 77..300_000, n - 5..n] {
        let got = read(file.clone(), &sealed, want.clone()).await;
        assert!(
            got == plain[want.start as usize..want.end as usize],
            "{want:?}"
        );
    }

    // Cut on disk under an open file: an error, not a crash or short body.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(sealed.len() as u64 / 2)
        .unwrap();
    let o = opener(&sealed, sealed.len() as u64);
    let (_, err) = drain(open_file_range(file, o, 0, n).unwrap()).await;
    assert_eq!(err, Some(SealError::Truncated));
    std::fs::remove_file(&path).unwrap();
}

/// Time to first byte: the first segment comes alone, and the stream then
/// gives the HTTP layer one turn (it writes what it holds when the body is
/// not ready) before decrypting the next batch. Checked by polling, not by
/// timing.
#[tokio::test]
async fn the_first_segment_leaves_before_the_next_batch_is_read() {
    let seg = 4096u32;
    let plain = data(2 * READ_AHEAD_BYTES as usize);
    let (sealed, _) = seal_all(&key(), ASSET, 1, seg, &plain);
    let file = MemFile::new(sealed.clone(), sealed.len());
    let o = opener(&sealed, sealed.len() as u64);
    let want = 10_000..900_000u64.min(plain.len() as u64);
    let mut stream = Box::pin(open_file_range(file.clone(), o, want.start, want.end).unwrap());
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(&first[..], &plain[10_000..3 * seg as usize]);
    assert_eq!(file.reads().len(), 1, "one segment read so far");
    assert!(
        futures::poll!(stream.next()).is_pending(),
        "no turn for the HTTP layer to send the first segment"
    );
    let (rest, err) = drain(stream).await;
    assert_eq!(err, None);
    assert!(rest == plain[3 * seg as usize..want.end as usize]);
}
