//! Decrypting a plaintext byte range from storage, a few segments at a time.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::Stream;

use super::header::{HEADER_LEN, TAG_LEN};
use super::keys::DataKey;
use super::opener::Opener;
use super::SealError;

/// How much sealed data one storage read fetches (whole segments; at least
/// one). Bounds the memory a range stream holds at once.
pub const READ_AHEAD_BYTES: u64 = 512 * 1024;

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
            // Several consecutive segments per storage read: one read per
            // 64 KiB segment spends more on the read (a blocking-pool hop,
            // an open and a seek for a file store) than on decrypting it.
            // Only segments the range touches are read; memory per stream
            // stays bounded by READ_AHEAD_BYTES.
            let index = self.next;
            let layout = *opener.layout();
            let per_read = (READ_AHEAD_BYTES / u64::from(layout.segment_size())).max(1);
            let last = (index + per_read).min(self.stop) - 1;
            let first_range = layout.sealed_range(index);
            let sealed = self
                .read_exact(first_range.start..layout.sealed_range(last).end)
                .await?;
            // Decrypt in the buffer storage filled (it is ours alone unless
            // the reader kept a reference: then one copy), moving each
            // segment's plaintext down over the tags before it, so the
            // batch leaves as one contiguous chunk with no second buffer.
            let mut buf = sealed
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            let offset = layout.plain_offset(index);
            let mut at_plain = 0usize;
            for i in index..=last {
                let r = layout.sealed_range(i);
                let at = (r.start - first_range.start) as usize;
                let len = (r.end - r.start) as usize;
                opener.open_segment_in_place(i, &mut buf[at..at + len])?;
                buf.copy_within(at..at + len - TAG_LEN, at_plain);
                at_plain += len - TAG_LEN;
            }
            buf.truncate(at_plain);
            let plain = buf.freeze();
            let from = self.start.saturating_sub(offset) as usize;
            let to = (self.end.min(offset + plain.len() as u64) - offset) as usize;
            self.next = last + 1;
            return Ok(Some((plain.slice(from..to), self)));
        }
    }
}
