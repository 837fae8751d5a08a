//! Sealed-blob behaviour through the public API: round trips, ranges,
//! streaming, and every attack the format must detect.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::executor::block_on;
use futures::{Stream, StreamExt};
use shared::{
    open_all, open_range, open_range_with, seal_all, seal_with_params, BlobId, DataKey, Opener,
    RangeRead, SealError, SealReader, SealedLayout, Sealer, HEADER_LEN, TAG_LEN,
};

const ASSET: &str = "asset-1";

fn key() -> DataKey {
    DataKey::from_bytes([0x42; 32])
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn seal(plain: &[u8], seg: u32) -> Vec<u8> {
    let (sealed, id) = seal_all(&key(), ASSET, 1, seg, plain);
    assert_eq!(id, BlobId::of(&sealed));
    sealed
}

/// Sealed range of segment `i` as a usize range.
fn seg_range(sealed: &[u8], seg: u32, i: u64) -> Range<usize> {
    let layout = SealedLayout::new(seg, sealed.len() as u64).unwrap();
    let r = layout.sealed_range(i);
    r.start as usize..r.end as usize
}

fn collect(stream: impl Stream<Item = Result<Bytes, SealError>>) -> Result<Vec<u8>, SealError> {
    block_on(async {
        let mut out = Vec::new();
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    })
}

fn range(sealed: &[u8], start: u64, end: u64) -> Result<Vec<u8>, SealError> {
    let stream = open_range(
        Bytes::copy_from_slice(sealed),
        key(),
        ASSET.into(),
        sealed.len() as u64,
        start,
        end,
    )?;
    collect(stream)
}

#[test]
fn round_trips_at_segment_boundaries() {
    for seg in [16u32, 64] {
        let s = seg as usize;
        for len in [0, 1, s - 1, s, s + 1, 2 * s, 7 * s + 3, 10 * s] {
            let plain = data(len);
            let sealed = seal(&plain, seg);
            let layout = SealedLayout::for_plaintext(seg, len as u64).unwrap();
            assert_eq!(
                sealed.len() as u64,
                layout.sealed_len(),
                "seg {seg} len {len}"
            );
            assert_eq!(
                open_all(&key(), ASSET, &sealed).unwrap(),
                plain,
                "seg {seg} len {len}"
            );
            assert_eq!(range(&sealed, 0, len as u64).unwrap(), plain);
        }
    }
}

#[test]
fn empty_plaintext_is_header_plus_one_tag() {
    let sealed = seal(b"", 16);
    assert_eq!(sealed.len(), HEADER_LEN + TAG_LEN);
    assert_eq!(&sealed[..5], b"SLMB\x01");
    assert_eq!(open_all(&key(), ASSET, &sealed).unwrap(), b"");
    assert_eq!(range(&sealed, 0, 0).unwrap(), b"");
}

#[test]
fn chunking_does_not_change_the_output() {
    let plain = data(1000);
    let salt = [9; 32];
    let prefix = [8; 7];
    let (whole, id) = seal_with_params(&key(), ASSET, 1, 64, salt, prefix, &plain);
    for chunk in [1, 3, 63, 64, 65, 200] {
        let mut sealer = Sealer::with_params(&key(), ASSET, 1, 64, salt, prefix);
        let mut out = Vec::new();
        for c in plain.chunks(chunk) {
            sealer.update(c, &mut out);
            assert!(out.len() as u64 == sealer.sealed_len());
        }
        sealer.update(&[], &mut out);
        let (id2, len) = sealer.finish(&mut out);
        assert_eq!(
            (out.as_slice(), id2, len),
            (whole.as_slice(), id, whole.len() as u64),
            "chunk {chunk}"
        );
    }
}

#[test]
fn sealer_buffers_at_most_one_segment() {
    let mut sealer = Sealer::new(&key(), ASSET, 1, 16);
    let mut out = Vec::new();
    sealer.update(&[1; 16], &mut out);
    assert_eq!(
        out.len(),
        HEADER_LEN,
        "a full segment waits to learn whether it is last"
    );
    sealer.update(&[1; 1], &mut out);
    assert_eq!(out.len(), HEADER_LEN + 32);
    sealer.update(&[1; 100], &mut out);
    assert_eq!(
        out.len(),
        HEADER_LEN + 32 * 7,
        "117 bytes: 7 segments sealed, 5 bytes buffered"
    );
}

#[test]
fn two_seals_of_the_same_plaintext_differ() {
    let plain = data(100);
    assert_ne!(seal(&plain, 16), seal(&plain, 16));
}

#[test]
fn every_range_of_a_small_blob() {
    let plain = data(100);
    let sealed = seal(&plain, 16);
    for start in 0..=100u64 {
        for end in start..=100u64 {
            let got = range(&sealed, start, end).unwrap();
            assert_eq!(got, &plain[start as usize..end as usize], "{start}..{end}");
        }
    }
    assert_eq!(range(&sealed, 0, 101), Err(SealError::RangeOutOfBounds));
    assert_eq!(range(&sealed, 100, 101), Err(SealError::RangeOutOfBounds));
    assert!(matches!(
        range(&sealed, 5, 4),
        Err(SealError::RangeOutOfBounds)
    ));
}

/// Records every read, to check what a range costs.
#[derive(Clone)]
struct Recording {
    data: Bytes,
    reads: Arc<Mutex<Vec<Range<u64>>>>,
}

impl RangeRead for Recording {
    fn read_range(
        &self,
        range: Range<u64>,
    ) -> impl std::future::Future<Output = std::io::Result<Bytes>> + Send {
        self.reads.lock().unwrap().push(range.clone());
        self.data.read_range(range)
    }
}

#[test]
fn a_range_reads_only_the_segments_it_touches_lazily() {
    let plain = data(1000);
    let sealed = seal(&plain, 64);
    let layout = SealedLayout::new(64, sealed.len() as u64).unwrap();
    let rec = Recording {
        data: Bytes::from(sealed.clone()),
        reads: Arc::default(),
    };
    let stream = open_range(
        rec.clone(),
        key(),
        ASSET.into(),
        sealed.len() as u64,
        130,
        300,
    )
    .unwrap();
    assert!(
        rec.reads.lock().unwrap().is_empty(),
        "nothing read before the first poll"
    );
    let mut stream = Box::pin(stream);
    let first = block_on(stream.next()).unwrap().unwrap();
    // Segments 2..=4 hold bytes 128..320: read together (read-ahead stays
    // within the range), and nothing before or after them. They come out
    // a chunk per segment, cut to the range.
    assert_eq!(&first[..], &plain[130..192]);
    let reads = vec![
        0..HEADER_LEN as u64,
        layout.sealed_range(2).start..layout.sealed_range(4).end,
    ];
    assert_eq!(*rec.reads.lock().unwrap(), reads);
    assert_eq!(collect(stream).unwrap(), &plain[192..300]);
    assert_eq!(*rec.reads.lock().unwrap(), reads, "nothing read twice");

    // With the header already parsed, only segments are read.
    rec.reads.lock().unwrap().clear();
    let opener = Opener::new(&key(), ASSET, &sealed, sealed.len() as u64).unwrap();
    let got = collect(open_range_with(rec.clone(), opener, 64, 65).unwrap()).unwrap();
    assert_eq!(got, &plain[64..65]);
    assert_eq!(*rec.reads.lock().unwrap(), vec![layout.sealed_range(1)]);
    let opener = Opener::new(&key(), ASSET, &sealed, sealed.len() as u64).unwrap();
    assert!(matches!(
        open_range_with(rec, opener, 0, 1001),
        Err(SealError::RangeOutOfBounds)
    ));
}

#[test]
fn a_short_read_from_storage_is_truncation() {
    struct Short(Bytes);
    impl RangeRead for Short {
        fn read_range(
            &self,
            range: Range<u64>,
        ) -> impl std::future::Future<Output = std::io::Result<Bytes>> + Send {
            let r = self.0.read_range(range);
            async move { r.await.map(|b| b.slice(..b.len().saturating_sub(1))) }
        }
    }
    let sealed = seal(&data(100), 16);
    let stream = open_range(
        Short(Bytes::from(sealed.clone())),
        key(),
        ASSET.into(),
        sealed.len() as u64,
        0,
        100,
    )
    .unwrap();
    assert_eq!(collect(stream), Err(SealError::Truncated));
}

#[test]
fn storage_errors_surface_as_io() {
    struct Failing;
    impl RangeRead for Failing {
        async fn read_range(&self, _: Range<u64>) -> std::io::Result<Bytes> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    let stream = open_range(Failing, key(), ASSET.into(), 1000, 0, 10).unwrap();
    let err = collect(stream).unwrap_err();
    assert_eq!(err, SealError::Io("disk on fire".into()));
    assert_eq!(err.code(), "seal_io");
}

#[test]
fn seal_reader_streams_the_same_blob() {
    use tokio::io::AsyncReadExt;
    let salt = [3; 32];
    let prefix = [4; 7];
    for len in [0usize, 1, 63, 64, 65, 200_000] {
        let plain = data(len);
        let (expected, id) = seal_with_params(&key(), ASSET, 1, 64, salt, prefix, &plain);
        let sealer = Sealer::with_params(&key(), ASSET, 1, 64, salt, prefix);
        let mut reader = SealReader::from_sealer(&plain[..], sealer);
        assert_eq!(reader.blob_id(), None);
        let mut out = Vec::new();
        block_on(reader.read_to_end(&mut out)).unwrap();
        assert_eq!(out, expected, "len {len}");
        assert_eq!(reader.blob_id(), Some(id));
        assert_eq!(reader.sealed_len(), expected.len() as u64);
    }
    // Random parameters still open.
    let plain = data(5000);
    let mut reader = SealReader::new(&plain[..], &key(), ASSET, 1, 256);
    let mut out = Vec::new();
    block_on(reader.read_to_end(&mut out)).unwrap();
    assert_eq!(reader.blob_id(), Some(BlobId::of(&out)));
    assert_eq!(open_all(&key(), ASSET, &out).unwrap(), plain);
}

#[test]
fn seal_reader_survives_tiny_read_buffers() {
    use tokio::io::AsyncReadExt;
    let plain = data(300);
    let mut reader = SealReader::new(&plain[..], &key(), ASSET, 1, 16);
    let mut out = Vec::new();
    let mut buf = [0u8; 5];
    loop {
        let n = block_on(reader.read(&mut buf)).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(open_all(&key(), ASSET, &out).unwrap(), plain);
    assert_eq!(reader.blob_id(), Some(BlobId::of(&out)));
}

// ---- attacks: each must be refused with its specific error ----

fn open(sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    let all = open_all(&key(), ASSET, sealed);
    // The streaming path must agree with the in-memory one.
    if sealed.len() >= HEADER_LEN + TAG_LEN {
        if let Ok(opener) = Opener::new(&key(), ASSET, sealed, sealed.len() as u64) {
            let len = opener.layout().plaintext_len();
            assert_eq!(range(sealed, 0, len), all);
        }
    }
    all
}

#[test]
fn a_flipped_bit_anywhere_in_a_segment_fails_that_segment() {
    let sealed = seal(&data(16 * 5 + 7), 16);
    let layout = SealedLayout::new(16, sealed.len() as u64).unwrap();
    for i in 0..layout.segment_count() {
        for pos in seg_range(&sealed, 16, i) {
            let mut bad = sealed.clone();
            bad[pos] ^= 1 << (pos % 8);
            assert_eq!(
                open_all(&key(), ASSET, &bad),
                Err(SealError::SegmentAuth { index: i }),
                "byte {pos}"
            );
        }
    }
    // Only the damaged segment fails: a range that avoids it still reads.
    let mut bad = sealed.clone();
    bad[seg_range(&sealed, 16, 3).start] ^= 1;
    assert_eq!(range(&bad, 0, 48).unwrap(), &data(16 * 5 + 7)[..48]);
    assert_eq!(
        range(&bad, 40, 60),
        Err(SealError::SegmentAuth { index: 3 })
    );
}

#[test]
fn header_bits_are_authenticated() {
    let sealed = seal(&data(50), 16);
    // key id, salt and nonce prefix: every segment's AAD and key change.
    for pos in 9..HEADER_LEN {
        let mut bad = sealed.clone();
        bad[pos] ^= 0x80;
        assert_eq!(
            open(&bad),
            Err(SealError::SegmentAuth { index: 0 }),
            "byte {pos}"
        );
    }
    let mut bad = sealed.clone();
    bad[0] = b'X';
    assert_eq!(open(&bad), Err(SealError::BadMagic));
    let mut bad = sealed.clone();
    bad[4] = 2;
    assert_eq!(open(&bad), Err(SealError::UnsupportedVersion(2)));
    let mut bad = sealed.clone();
    bad[5..9].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(open(&bad), Err(SealError::BadHeader(_))));
    let mut bad = sealed.clone();
    bad[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(open(&bad), Err(SealError::BadHeader(_))));
    // A segment size that fits the length differently still fails auth.
    let mut bad = sealed.clone();
    bad[5..9].copy_from_slice(&17u32.to_be_bytes());
    assert!(matches!(
        open(&bad),
        Err(SealError::SegmentAuth { .. } | SealError::InvalidLength)
    ));
}

#[test]
fn dropping_the_last_segment_is_detected() {
    // partial last segment
    let sealed = seal(&data(16 * 5 + 5), 16);
    let cut = seg_range(&sealed, 16, 5).start;
    assert_eq!(
        open(&sealed[..cut]),
        Err(SealError::SegmentAuth { index: 4 })
    );
    // full last segment
    let sealed = seal(&data(64), 16);
    let cut = seg_range(&sealed, 16, 3).start;
    assert_eq!(
        open(&sealed[..cut]),
        Err(SealError::SegmentAuth { index: 2 })
    );
    // down to the header alone
    assert_eq!(open(&sealed[..HEADER_LEN]), Err(SealError::Truncated));
    assert_eq!(open(&sealed[..10]), Err(SealError::Truncated));
    assert_eq!(open(&[]), Err(SealError::Truncated));
}

#[test]
fn cutting_inside_a_segment_is_detected() {
    let sealed = seal(&data(48), 16); // 3 full segments
                                      // Leaves a short but plausible last segment: its tag fails.
    assert_eq!(
        open(&sealed[..sealed.len() - 10]),
        Err(SealError::SegmentAuth { index: 2 })
    );
    // Leaves fewer bytes than a tag: no blob has that length.
    assert_eq!(
        open(&sealed[..sealed.len() - 20]),
        Err(SealError::InvalidLength)
    );
    // Leaves exactly a tag after full segments: not canonical.
    assert_eq!(
        open(&sealed[..sealed.len() - 16]),
        Err(SealError::InvalidLength)
    );
}

#[test]
fn appended_bytes_are_detected() {
    let sealed = seal(&data(16 * 3 + 4), 16);
    let mut one = sealed.clone();
    one.push(0);
    assert_eq!(open(&one), Err(SealError::SegmentAuth { index: 3 }));
    // A whole extra segment copied from the blob itself.
    let mut dup = sealed.clone();
    dup.extend_from_slice(&sealed[seg_range(&sealed, 16, 0)]);
    assert_eq!(open(&dup), Err(SealError::SegmentAuth { index: 3 }));
    // Appending to a blob whose last segment is full.
    let full = seal(&data(32), 16);
    let mut more = full.clone();
    more.extend_from_slice(&[0; 5]);
    assert_eq!(open(&more), Err(SealError::InvalidLength));
    more.extend_from_slice(&[0; 15]);
    assert_eq!(open(&more), Err(SealError::SegmentAuth { index: 1 }));
}

#[test]
fn swapped_segments_are_detected() {
    let sealed = seal(&data(16 * 4), 16);
    let (a, b) = (seg_range(&sealed, 16, 1), seg_range(&sealed, 16, 2));
    let mut bad = sealed.clone();
    bad[a.clone()].copy_from_slice(&sealed[b.clone()]);
    bad[b].copy_from_slice(&sealed[a]);
    assert_eq!(open(&bad), Err(SealError::SegmentAuth { index: 1 }));
    // Swapping in the last (flagged) segment too.
    let (a, b) = (seg_range(&sealed, 16, 0), seg_range(&sealed, 16, 3));
    let mut bad = sealed.clone();
    bad[a.clone()].copy_from_slice(&sealed[b.clone()]);
    bad[b].copy_from_slice(&sealed[a]);
    assert_eq!(open(&bad), Err(SealError::SegmentAuth { index: 0 }));
}

#[test]
fn segments_from_another_asset_or_blob_are_detected() {
    let plain = data(16 * 4);
    let (salt, prefix) = ([5; 32], [6; 7]);
    let (mine, _) = seal_with_params(&key(), ASSET, 1, 16, salt, prefix, &plain);
    // Same key, salt, prefix and plaintext; only the asset differs.
    let (theirs, _) = seal_with_params(&key(), "asset-2", 1, 16, salt, prefix, &plain);
    assert_ne!(mine[HEADER_LEN..], theirs[HEADER_LEN..]);
    let r = seg_range(&mine, 16, 1);
    let mut bad = mine.clone();
    bad[r.clone()].copy_from_slice(&theirs[r.clone()]);
    assert_eq!(open(&bad), Err(SealError::SegmentAuth { index: 1 }));
    // The whole blob under the other asset's id.
    assert_eq!(
        open_all(&key(), "asset-2", &mine),
        Err(SealError::SegmentAuth { index: 0 })
    );
    // Another blob of the same asset (fresh salt).
    let other = seal(&plain, 16);
    let mut bad = mine.clone();
    bad[r.clone()].copy_from_slice(&other[r]);
    assert_eq!(open(&bad), Err(SealError::SegmentAuth { index: 1 }));
}

#[test]
fn a_zeroed_4k_run_is_detected() {
    let plain = data(64 * 1024);
    let sealed = seal(&plain, 4096);
    let mut bad = sealed.clone();
    bad[10_000..10_000 + 4096].fill(0);
    let first = ((10_000 - HEADER_LEN) / (4096 + TAG_LEN)) as u64;
    assert_eq!(open(&bad), Err(SealError::SegmentAuth { index: first }));
    // An all-zero "blob" is not a blob at all.
    assert_eq!(open(&vec![0; sealed.len()]), Err(SealError::BadMagic));
}

#[test]
fn the_wrong_key_is_detected() {
    let sealed = seal(&data(40), 16);
    let wrong = DataKey::from_bytes([0x43; 32]);
    assert_eq!(
        open_all(&wrong, ASSET, &sealed),
        Err(SealError::SegmentAuth { index: 0 })
    );
    let opener = Opener::new(&wrong, ASSET, &sealed, sealed.len() as u64).unwrap();
    let r = seg_range(&sealed, 16, 2);
    assert_eq!(
        opener.open_segment(2, &sealed[r]),
        Err(SealError::SegmentAuth { index: 2 })
    );
}

#[test]
fn open_segment_checks_its_input_length_and_index() {
    let plain = data(40);
    let sealed = seal(&plain, 16);
    let opener = Opener::new(&key(), ASSET, &sealed[..HEADER_LEN], sealed.len() as u64).unwrap();
    let r = seg_range(&sealed, 16, 1);
    assert_eq!(
        opener.open_segment(1, &sealed[r.clone()]).unwrap(),
        &plain[16..32]
    );
    assert_eq!(
        opener.open_segment(1, &sealed[r.start..r.end - 1]),
        Err(SealError::Truncated)
    );
    assert_eq!(
        opener.open_segment(1, &sealed[r.start..r.end + 1]),
        Err(SealError::InvalidLength)
    );
    assert_eq!(
        opener.open_segment(3, &sealed[r]),
        Err(SealError::RangeOutOfBounds)
    );
    assert_eq!(opener.header().segment_size, 16);
    assert_eq!(opener.header().key_id, 1);
}

#[test]
fn error_codes_are_stable() {
    let codes = [
        (SealError::BadMagic, "seal_bad_magic"),
        (SealError::UnsupportedVersion(9), "seal_unsupported_version"),
        (SealError::BadHeader(String::new()), "seal_bad_header"),
        (SealError::Truncated, "seal_truncated"),
        (SealError::InvalidLength, "seal_invalid_length"),
        (SealError::SegmentAuth { index: 0 }, "seal_segment_auth"),
        (SealError::RangeOutOfBounds, "seal_range_out_of_bounds"),
        (SealError::UnknownKeyId(1), "seal_unknown_key_id"),
        (SealError::KeyUnwrap, "seal_key_unwrap"),
        (SealError::InvalidKey(String::new()), "seal_invalid_key"),
        (SealError::Io(String::new()), "seal_io"),
    ];
    for (e, code) in codes {
        assert_eq!(e.code(), code);
    }
    assert!(SealError::SegmentAuth { index: 0 }.is_damage());
    assert!(!SealError::Io(String::new()).is_damage());
    let io: std::io::Error = SealError::Truncated.into();
    assert_eq!(io.kind(), std::io::ErrorKind::InvalidData);
}
