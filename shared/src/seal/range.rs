//! Decrypting a plaintext byte range from storage, a few segments at a time.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::Stream;

use super::header::{HEADER_LEN, TAG_LEN};
use super::keys::DataKey;
use super::opener::Opener;
use super::SealError;

/// How much sealed data one storage read fetches (whole segments; at least
/// one). Bounds the memory a range stream holds at once.
pub const READ_AHEAD_BYTES: u64 = 256 * 1024;

/// Random access to the sealed bytes of one blob: the seam between the
/// seal layer and storage. Encryption wraps storage; storage knows nothing
/// of keys.
pub trait RangeRead {
    /// Reads exactly `range` (absolute offsets). Returning fewer bytes is
    /// treated as truncation.
    fn read_range(&self, range: Range<u64>) -> impl Future<Output = io::Result<Bytes>> + Send;
}

fn slice_of(data: &Bytes, range: Range<u64>) -> io::Result<Bytes> {
    if range.start > range.end || range.end > data.len() as u64 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("range {range:?} is outside {} bytes", data.len()),
        ));
    }
    Ok(data.slice(range.start as usize..range.end as usize))
}

/// In memory, for tests and small blobs.
impl RangeRead for Bytes {
    fn read_range(&self, range: Range<u64>) -> impl Future<Output = io::Result<Bytes>> + Send {
        std::future::ready(slice_of(self, range))
    }
}

impl<T: RangeRead + Send + Sync> RangeRead for Arc<T> {
    fn read_range(&self, range: Range<u64>) -> impl Future<Output = io::Result<Bytes>> + Send {
        (**self).read_range(range)
    }
}

/// Streams plaintext bytes `start..end` of a sealed blob of `sealed_len`
/// bytes.
///
/// Nothing is read until the stream is polled. The first poll reads the
/// header; each poll after that reads and authenticates exactly one touched
/// segment and yields its part of the range, so one segment is in memory at
/// a time and a slow consumer slows the reads. The stream ends after the
/// first error. Errors known without reading (`start > end`, a length too
/// short for a blob) are returned at once; `end` beyond the plaintext comes
/// as `RangeOutOfBounds` from the first poll. Callers that already parsed
/// the header use [`open_range_with`], which checks bounds up front.
pub fn open_range<R>(
    reader: R,
    key: DataKey,
    asset_id: String,
    sealed_len: u64,
    start: u64,
    end: u64,
) -> Result<impl Stream<Item = Result<Bytes, SealError>> + Send + 'static, SealError>
where
    R: RangeRead + Send + Sync + 'static,
{
    if start > end {
        return Err(SealError::RangeOutOfBounds);
    }
    if sealed_len < (HEADER_LEN + TAG_LEN) as u64 {
        return Err(SealError::Truncated);
    }
    let state = State {
        reader,
        opener: Pending::Header { key, asset_id },
        sealed_len,
        start,
        end,
        next: 0,
        stop: 0,
        pending: VecDeque::new(),
    };
    Ok(futures::stream::try_unfold(state, State::step))
}

/// [`open_range`] with an [`Opener`] built from a header already read:
/// bounds are checked here, and the stream reads only segments.
pub fn open_range_with<R>(
    reader: R,
    opener: Opener,
    start: u64,
    end: u64,
) -> Result<impl Stream<Item = Result<Bytes, SealError>> + Send + 'static, SealError>
where
    R: RangeRead + Send + Sync + 'static,
{
    let layout = *opener.layout();
    if start > end || end > layout.plaintext_len() {
        return Err(SealError::RangeOutOfBounds);
    }
    let segments = layout.segments_for(start, end);
    let state = State {
        reader,
        opener: Pending::Ready(Box::new(opener)),
        sealed_len: layout.sealed_len(),
        start,
        end,
        next: segments.start,
        stop: segments.end,
        pending: VecDeque::new(),
    };
    Ok(futures::stream::try_unfold(state, State::step))
}

enum Pending {
    Header { key: DataKey, asset_id: String },
    Ready(Box<Opener>),
}

struct State<R> {
    reader: R,
    opener: Pending,
    sealed_len: u64,
    start: u64,
    end: u64,
    next: u64,
    stop: u64,
    /// Plaintext of the last batch not yet yielded, a slice per segment.
    pending: VecDeque<Bytes>,
}

impl<R: RangeRead + Send + Sync> State<R> {
    async fn read_exact(&self, range: Range<u64>) -> Result<Bytes, SealError> {
        let want = range.end - range.start;
        let bytes = self.reader.read_range(range).await?;
        match (bytes.len() as u64).cmp(&want) {
            std::cmp::Ordering::Less => Err(SealError::Truncated),
            std::cmp::Ordering::Greater => Err(SealError::Io(
                "storage returned more bytes than asked".into(),
            )),
            std::cmp::Ordering::Equal => Ok(bytes),
        }
    }

    async fn step(mut self) -> Result<Option<(Bytes, State<R>)>, SealError> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Ok(Some((chunk, self)));
            }
            let opener = match &self.opener {
                Pending::Ready(opener) => opener,
                Pending::Header { key, asset_id } => {
                    let header = self.read_exact(0..HEADER_LEN as u64).await?;
                    let opener = Opener::new(key, asset_id, &header, self.sealed_len)?;
                    let layout = *opener.layout();
                    if self.end > layout.plaintext_len() {
                        return Err(SealError::RangeOutOfBounds);
                    }
                    let segments = layout.segments_for(self.start, self.end);
                    (self.next, self.stop) = (segments.start, segments.end);
                    self.opener = Pending::Ready(Box::new(opener));
                    continue;
                }
            };
            if self.next >= self.stop {
                return Ok(None);
            }
            let batch = Batch::at(opener, self.next, self.stop, READ_AHEAD_BYTES);
            let sealed = self.read_exact(batch.sealed.clone()).await?;
            // Decrypt in the buffer storage filled (it is ours alone unless
            // the reader kept a reference: then one copy).
            let mut buf = sealed
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            batch.open_in_place(opener, &mut buf)?;
            batch.push_slices(
                opener,
                buf.freeze(),
                self.start..self.end,
                &mut self.pending,
            );
            self.next = batch.last + 1;
        }
    }
}

/// Consecutive segments read and opened together: one storage read per
/// 64 KiB segment spends more on the read (a blocking-pool hop, a seek, a
/// syscall) than on decrypting it. Only segments the range touches are in
/// a batch, and a batch holds at most [`READ_AHEAD_BYTES`] of plaintext
/// (at least one segment), which bounds the memory per stream.
struct Batch {
    first: u64,
    last: u64,
    /// Where the batch lies in the blob.
    sealed: Range<u64>,
}

impl Batch {
    /// The batch starting at segment `next`: up to `max_plain` bytes of
    /// plaintext, never past `stop`.
    fn at(opener: &Opener, next: u64, stop: u64, max_plain: u64) -> Batch {
        let layout = opener.layout();
        let per_read = (max_plain / u64::from(layout.segment_size())).max(1);
        let last = (next + per_read).min(stop) - 1;
        Batch {
            first: next,
            last,
            sealed: layout.sealed_range(next).start..layout.sealed_range(last).end,
        }
    }

    fn len(&self) -> usize {
        (self.sealed.end - self.sealed.start) as usize
    }

    /// Each segment's place in a buffer holding the batch's sealed bytes.
    fn segments<'a>(
        &'a self,
        opener: &'a Opener,
    ) -> impl Iterator<Item = (u64, Range<usize>)> + 'a {
        (self.first..=self.last).map(move |i| {
            let r = opener.layout().sealed_range(i);
            let at = (r.start - self.sealed.start) as usize;
            (i, at..at + (r.end - r.start) as usize)
        })
    }

    /// Authenticates and decrypts every segment where it lies in `buf`
    /// (exactly the batch's sealed bytes). Each segment's plaintext is then
    /// the start of its sealed place, its tag left behind it.
    fn open_in_place(&self, opener: &Opener, buf: &mut [u8]) -> Result<(), SealError> {
        for (i, place) in self.segments(opener) {
            opener.open_segment_in_place(i, &mut buf[place])?;
        }
        Ok(())
    }

    /// Queues the part of each opened segment that `want` (plaintext
    /// offsets) covers, as slices of `opened` with the tags skipped: no
    /// bytes are moved, and the HTTP layer writes the slices as one
    /// vectored write.
    fn push_slices(
        &self,
        opener: &Opener,
        opened: Bytes,
        want: Range<u64>,
        out: &mut VecDeque<Bytes>,
    ) {
        let layout = opener.layout();
        for (i, place) in self.segments(opener) {
            let plain = layout.plain_range(i);
            let from = want.start.max(plain.start);
            let to = want.end.min(plain.end);
            if from < to {
                let at = place.start + (from - plain.start) as usize;
                out.push_back(opened.slice(at..at + (to - from) as usize));
            }
        }
    }
}

/// Positional reads from a local file.
pub trait ReadAt: Send + Sync + 'static {
    /// Fills `buf` from `offset`, waiting for the disk if it must; a short
    /// file is `UnexpectedEof`. Called on the blocking pool.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Reads into `buf` from `offset` only what needs no disk I/O (the page
    /// cache), returning how much that was; the rest, if any, goes through
    /// [`read_exact_at`](ReadAt::read_exact_at). Called on an async worker,
    /// so it must never block. The default reads nothing.
    fn read_cached_at(&self, _buf: &mut [u8], _offset: u64) -> usize {
        0
    }
}

#[cfg(unix)]
impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    #[cfg(target_os = "linux")]
    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> usize {
        use std::os::fd::AsRawFd;
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            let Ok(at) = libc::off_t::try_from(offset + done as u64) else {
                break;
            };
            // SAFETY: one iovec over `rest`, which outlives the call; the
            // kernel writes at most `rest.len()` bytes into it.
            let n = unsafe { libc::preadv2(self.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
            // EAGAIN (not cached), EOPNOTSUPP (an old kernel or a file
            // system without it), end of file or any error: the blocking
            // read takes over and reports what is really wrong.
            if n <= 0 {
                break;
            }
            done += n as usize;
        }
        done
    }
}

/// [`open_range_with`] for a blob in a local file, the view node's hot
/// path: each batch is read with `pread` into a recycled buffer and
/// decrypted where it lies.
///
/// A batch already in the page cache (a movie being watched) is read and
/// decrypted right on the async worker: a 256 KiB batch takes about
/// 0.1 ms, less than handing it to another thread and back costs in
/// wake-ups, and the plaintext is still in this core's cache when the
/// socket copies it. A batch that needs the disk goes to the blocking pool
/// (read and decrypt together), so a slow disk never stalls the workers
/// that serve other viewers. Must run inside a Tokio runtime.
pub fn open_file_range<F: ReadAt>(
    file: Arc<F>,
    opener: Opener,
    start: u64,
    end: u64,
) -> Result<impl Stream<Item = Result<Bytes, SealError>> + Send + 'static, SealError> {
    let layout = *opener.layout();
    if start > end || end > layout.plaintext_len() {
        return Err(SealError::RangeOutOfBounds);
    }
    let segments = layout.segments_for(start, end);
    let state = FileState {
        file,
        opener: Arc::new(opener),
        want: start..end,
        first: segments.start,
        next: segments.start,
        stop: segments.end,
        pending: VecDeque::new(),
    };
    Ok(futures::stream::try_unfold(state, FileState::step))
}

struct FileState<F> {
    file: Arc<F>,
    opener: Arc<Opener>,
    want: Range<u64>,
    /// The range's first segment.
    first: u64,
    next: u64,
    stop: u64,
    pending: VecDeque<Bytes>,
}

impl<F: ReadAt> FileState<F> {
    async fn step(mut self) -> Result<Option<(Bytes, FileState<F>)>, SealError> {
        if self.pending.is_empty() && self.next < self.stop {
            // The first batch is one segment, and the batch after it waits
            // for one turn of the scheduler: the HTTP layer pulls body
            // chunks until its buffer fills or the body is not ready, so
            // without that turn the headers would leave only after about
            // 400 KiB were decrypted. Time to first byte is what a viewer
            // waits for after a seek.
            if self.next == self.first + 1 {
                tokio::task::yield_now().await;
            }
            let max = if self.next == self.first {
                0
            } else {
                READ_AHEAD_BYTES
            };
            let batch = Batch::at(&self.opener, self.next, self.stop, max);
            let mut buf = pool::take(batch.len());
            let cached = self.file.read_cached_at(&mut buf, batch.sealed.start);
            let (batch, buf) = if cached == buf.len() {
                batch.open_in_place(&self.opener, &mut buf)?;
                (batch, buf)
            } else {
                let (file, opener) = (self.file.clone(), self.opener.clone());
                tokio::task::spawn_blocking(move || {
                    file.read_exact_at(&mut buf[cached..], batch.sealed.start + cached as u64)
                        .map_err(|e| match e.kind() {
                            io::ErrorKind::UnexpectedEof => SealError::Truncated,
                            _ => SealError::from(e),
                        })?;
                    batch.open_in_place(&opener, &mut buf)?;
                    Ok::<_, SealError>((batch, buf))
                })
                .await
                .map_err(|e| SealError::Io(format!("read task failed: {e}")))??
            };
            batch.push_slices(
                &self.opener,
                Bytes::from_owner(buf),
                self.want.clone(),
                &mut self.pending,
            );
            self.next = batch.last + 1;
        }
        Ok(self.pending.pop_front().map(|chunk| (chunk, self)))
    }
}

/// Batch buffers, recycled: a fresh allocation of a batch's size is mapped
/// anew by the allocator and page-faults on first touch, which cost more
/// than the read that fills it. A buffer goes back when the last slice of it has
/// been written to the socket. Plaintext left in a free buffer is
/// overwritten by the next read before anyone sees it.
mod pool {
    use super::*;

    /// Free buffers kept; more in flight are simply freed when done.
    const KEEP: usize = 64;

    static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    /// A buffer of exactly `len` bytes, handed back to the pool on drop.
    pub(super) struct Buf(Vec<u8>);

    pub(super) fn take(len: usize) -> Buf {
        let mut v = FREE
            .lock()
            .map(|mut f| f.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        // Same-sized in practice (one segment size per node); a batch at a
        // blob's end is shorter, and resizing down keeps the allocation.
        v.resize(len, 0);
        Buf(v)
    }

    impl std::ops::Deref for Buf {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            &self.0
        }
    }

    impl std::ops::DerefMut for Buf {
        fn deref_mut(&mut self) -> &mut [u8] {
            &mut self.0
        }
    }

    impl AsRef<[u8]> for Buf {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Buf {
        fn drop(&mut self) {
            if let Ok(mut free) = FREE.lock() {
                if free.len() < KEEP {
                    free.push(std::mem::take(&mut self.0));
                }
            }
        }
    }
}
