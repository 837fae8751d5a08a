//! An `AsyncRead` that seals what it reads.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::keys::DataKey;
use super::sealer::Sealer;
use crate::BlobId;

/// Reads plaintext from `R` and yields the sealed blob, in constant memory
/// (about two segments). After it has returned EOF,
/// [`blob_id`](SealReader::blob_id) names the blob and
/// [`sealed_len`](SealReader::sealed_len) is its length.
#[derive(Debug)]
pub struct SealReader<R> {
    inner: R,
    sealer: Option<Sealer>,
    input: Vec<u8>,
    output: Vec<u8>,
    pos: usize,
    sealed_len: u64,
    blob_id: Option<BlobId>,
}

impl<R: AsyncRead + Unpin> SealReader<R> {
    /// See [`Sealer::new`] (same arguments, same panics).
    pub fn new(inner: R, key: &DataKey, asset_id: &str, key_id: u32, segment_size: u32) -> Self {
        SealReader::from_sealer(inner, Sealer::new(key, asset_id, key_id, segment_size))
    }

    /// Wraps a sealer that has not been fed yet.
    pub fn from_sealer(inner: R, sealer: Sealer) -> Self {
        SealReader {
            inner,
            sealer: Some(sealer),
            input: vec![0; 64 * 1024],
            output: Vec::new(),
            pos: 0,
            sealed_len: 0,
            blob_id: None,
        }
    }

    /// The blob's name, once the whole blob has been read.
    pub fn blob_id(&self) -> Option<BlobId> {
        self.blob_id
    }

    /// Sealed bytes handed out so far; the blob's length after EOF.
    pub fn sealed_len(&self) -> u64 {
        self.sealed_len
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SealReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.pos);
                buf.put_slice(&this.output[this.pos..this.pos + n]);
                this.pos += n;
                this.sealed_len += n as u64;
                if this.pos == this.output.len() {
                    this.output.clear();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let Some(sealer) = this.sealer.as_mut() else {
                return Poll::Ready(Ok(())); // EOF
            };
            let mut rb = ReadBuf::new(&mut this.input);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                let sealer = this.sealer.take().expect("checked above");
                let (id, _) = sealer.finish(&mut this.output);
                this.blob_id = Some(id);
                if this.output.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            } else {
                sealer.update(&this.input[..n], &mut this.output);
            }
        }
    }
}
