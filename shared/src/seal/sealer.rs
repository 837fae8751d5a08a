//! Writing sealed blobs in constant memory.

use std::fmt;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, Nonce};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::header::{
    check_segment_size, segment_cipher, segment_nonce, SealedHeader, HEADER_LEN, NONCE_PREFIX_LEN,
    SALT_LEN,
};
use super::keys::DataKey;
use crate::BlobId;

/// Seals a plaintext stream into a blob, hashing the output as it goes.
///
/// Feed plaintext with [`update`](Sealer::update) in any chunk sizes and
/// end with [`finish`](Sealer::finish); both append sealed bytes to `out`.
/// At most one segment of plaintext is buffered (the last segment carries a
/// flag, so a full segment waits until more input or `finish` shows whether
/// it is the last).
///
/// Once a blob passes [`PIPELINE_AFTER`] bytes, on a machine with more than
/// one core, SHA-256 of the sealed bytes moves to a helper thread while this
/// one encrypts the next segment (see [`HashPipe`]); the result is the same.
pub struct Sealer {
    cipher: Aes256Gcm,
    header: [u8; HEADER_LEN],
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    segment_size: usize,
    next_index: u64,
    buf: Zeroizing<Vec<u8>>,
    hasher: Hashing,
    sealed_len: u64,
    header_written: bool,
}

/// Sealed bytes after which hashing moves to a helper thread: small blobs
/// (and the tests' tiny segments) never start one.
const PIPELINE_AFTER: u64 = 256 * 1024;
/// Smallest segment worth handing to another thread.
const PIPELINE_MIN_SEGMENT: usize = 16 * 1024;
/// Sealed bytes handed over at once (or one segment, if larger). Each
/// hand-over can wake a thread; 1 MiB sealed 8 % faster than 256 KiB and
/// 20 % faster than one 64 KiB segment at a time (`scripts/bench seal`).
const PIPELINE_BATCH: usize = 1 << 20;
/// Sealed bytes queued for the hashing thread at most (at least one
/// batch): bounds memory when hashing is the slower side, as it is.
const PIPELINE_QUEUE_BYTES: usize = 4 << 20;

enum Hashing {
    Inline(Sha256),
    Piped(HashPipe),
    /// Only while switching from one to the other.
    Moving,
}

/// SHA-256 on a helper thread. Sealed segments are gathered in `batch`,
/// which goes to the thread, in order, through a bounded channel and comes
/// back emptied through `spare` for reuse. Only sealed bytes (ciphertext,
/// public) cross over; the plaintext stays in the sealer's zeroized buffer.
struct HashPipe {
    tx: SyncSender<Vec<u8>>,
    worker: JoinHandle<Sha256>,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    batch: Vec<u8>,
    batch_len: usize,
}

impl HashPipe {
    /// Starts the thread, continuing `hasher`; gives `hasher` back if the
    /// machine has one core or no thread can be started.
    fn start(hasher: Sha256, segment_size: usize) -> Result<HashPipe, Sha256> {
        static CORES: OnceLock<usize> = OnceLock::new();
        let cores =
            *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if cores < 2 || segment_size < PIPELINE_MIN_SEGMENT {
            return Err(hasher);
        }
        let batch_len = PIPELINE_BATCH.max(segment_size + super::TAG_LEN);
        let depth = (PIPELINE_QUEUE_BYTES / batch_len).max(1);
        let (tx, rx) = sync_channel::<Vec<u8>>(depth);
        let spare = Arc::new(Mutex::new(Vec::new()));
        let back = spare.clone();
        // The hasher moves into the thread; if spawning fails it is lost
        // with the closure, so spawn with a clone and drop the original
        // only on success.
        let mut state = hasher.clone();
        let worker = std::thread::Builder::new()
            .name("seal-sha256".into())
            .spawn(move || {
                while let Ok(mut piece) = rx.recv() {
                    state.update(&piece);
                    piece.clear();
                    let mut spare = back.lock().unwrap_or_else(|e| e.into_inner());
                    if spare.len() <= depth {
                        spare.push(piece);
                    }
                }
                state
            });
        match worker {
            Ok(worker) => Ok(HashPipe {
                tx,
                worker,
                spare,
                batch: Vec::with_capacity(batch_len + segment_size + super::TAG_LEN),
                batch_len,
            }),
            Err(_) => Err(hasher),
        }
    }

    /// Encrypts `plain` into the batch and copies the sealed segment to
    /// `out`; hands the batch over once it is full.
    fn seal_into(
        &mut self,
        cipher: &Aes256Gcm,
        nonce: &Nonce<U12>,
        aad: &[u8],
        plain: &[u8],
        out: &mut Vec<u8>,
    ) {
        let at = self.batch.len();
        self.batch.resize(at + plain.len(), 0);
        let buf = InOutBuf::new(plain, &mut self.batch[at..]).expect("same lengths");
        let tag = cipher
            .encrypt_inout_detached(nonce, aad, buf)
            .expect("AES-GCM encrypts any segment-sized input");
        self.batch.extend_from_slice(&tag);
        out.extend_from_slice(&self.batch[at..]);
        if self.batch.len() >= self.batch_len {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let next = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let next = next.unwrap_or_else(|| Vec::with_capacity(self.batch.capacity()));
        // The worker only stops when `tx` is dropped, or by panicking,
        // which `finish` reports.
        let _ = self.tx.send(std::mem::replace(&mut self.batch, next));
    }

    fn finish(mut self) -> Sha256 {
        self.flush();
        drop(self.tx);
        match self.worker.join() {
            Ok(hasher) => hasher,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("segment_size", &self.segment_size)
            .field("sealed_len", &self.sealed_len)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer with a fresh random salt and nonce prefix.
    ///
    /// `key_id` is the id of the master key that wraps `key` (recorded in
    /// the header). Use [`DEFAULT_SEGMENT_SIZE`](super::DEFAULT_SEGMENT_SIZE)
    /// unless testing.
    ///
    /// # Panics
    /// If `segment_size` is outside
    /// [`MIN_SEGMENT_SIZE`](super::MIN_SEGMENT_SIZE)`..=`[`MAX_SEGMENT_SIZE`](super::MAX_SEGMENT_SIZE).
    pub fn new(key: &DataKey, asset_id: &str, key_id: u32, segment_size: u32) -> Sealer {
        let mut salt = [0u8; SALT_LEN];
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        OsRng.fill_bytes(&mut salt);
        OsRng.fill_bytes(&mut nonce_prefix);
        Sealer::with_params(key, asset_id, key_id, segment_size, salt, nonce_prefix)
    }

    /// A sealer with a chosen salt and nonce prefix: for test vectors only.
    #[doc(hidden)]
    pub fn with_params(
        key: &DataKey,
        asset_id: &str,
        key_id: u32,
        segment_size: u32,
        salt: [u8; SALT_LEN],
        nonce_prefix: [u8; NONCE_PREFIX_LEN],
    ) -> Sealer {
        if let Err(e) = check_segment_size(segment_size) {
            panic!("Sealer::new: {e}");
        }
        let header = SealedHeader {
            segment_size,
            key_id,
            salt,
            nonce_prefix,
        };
        Sealer {
            cipher: segment_cipher(key, asset_id, &salt),
            header: header.to_bytes(),
            nonce_prefix,
            segment_size: segment_size as usize,
            next_index: 0,
            buf: Zeroizing::new(Vec::with_capacity(segment_size as usize)),
            hasher: Hashing::Inline(Sha256::new()),
            sealed_len: 0,
            header_written: false,
        }
    }

    /// Sealed bytes emitted so far.
    pub fn sealed_len(&self) -> u64 {
        self.sealed_len
    }

    /// Seals `plaintext`, appending whatever sealed bytes are ready to
    /// `out` (the header on the first call).
    pub fn update(&mut self, mut plaintext: &[u8], out: &mut Vec<u8>) {
        self.write_header(out);
        while !plaintext.is_empty() {
            if self.buf.len() == self.segment_size {
                // More input exists, so the buffered segment is not the last.
                let buf = std::mem::take(&mut *self.buf);
                self.seal_segment(&buf, false, out);
                *self.buf = buf;
                self.buf.clear();
            }
            if self.buf.is_empty() && plaintext.len() > self.segment_size {
                // Fast path: a whole segment with input after it.
                let (seg, rest) = plaintext.split_at(self.segment_size);
                self.seal_segment(seg, false, out);
                plaintext = rest;
                continue;
            }
            let take = (self.segment_size - self.buf.len()).min(plaintext.len());
            self.buf.extend_from_slice(&plaintext[..take]);
            plaintext = &plaintext[take..];
        }
    }

    /// Seals the buffered rest as the last segment, appends it to `out`,
    /// and returns the blob's name and total sealed length.
    pub fn finish(mut self, out: &mut Vec<u8>) -> (BlobId, u64) {
        self.write_header(out);
        let buf = std::mem::take(&mut *self.buf);
        self.seal_segment(&buf, true, out);
        *self.buf = buf; // zeroed on drop
        let hasher = match std::mem::replace(&mut self.hasher, Hashing::Moving) {
            Hashing::Inline(hasher) => hasher,
            Hashing::Piped(pipe) => pipe.finish(),
            Hashing::Moving => unreachable!("the hasher is always put back"),
        };
        (BlobId::from_hasher(hasher), self.sealed_len)
    }

    fn write_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_written {
            self.header_written = true;
            out.extend_from_slice(&self.header);
            match &mut self.hasher {
                Hashing::Inline(hasher) => hasher.update(self.header),
                _ => unreachable!("the header comes first"),
            }
            self.sealed_len += HEADER_LEN as u64;
        }
    }

    fn seal_segment(&mut self, plain: &[u8], last: bool, out: &mut Vec<u8>) {
        let index =
            u32::try_from(self.next_index).expect("a sealed blob holds at most 2^32 segments");
        let nonce = segment_nonce(&self.nonce_prefix, index, last);
        if self.sealed_len >= PIPELINE_AFTER {
            if let Hashing::Inline(_) = self.hasher {
                let Hashing::Inline(hasher) = std::mem::replace(&mut self.hasher, Hashing::Moving)
                else {
                    unreachable!("matched above")
                };
                self.hasher = match HashPipe::start(hasher, self.segment_size) {
                    Ok(pipe) => Hashing::Piped(pipe),
                    Err(hasher) => Hashing::Inline(hasher),
                };
            }
        }
        let start = out.len();
        match &mut self.hasher {
            Hashing::Inline(hasher) => {
                out.extend_from_slice(plain);
                let tag = self
                    .cipher
                    .encrypt_inout_detached(&nonce, &self.header, (&mut out[start..]).into())
                    .expect("AES-GCM encrypts any segment-sized input");
                out.extend_from_slice(&tag);
                hasher.update(&out[start..]);
            }
            Hashing::Piped(pipe) => {
                // Encrypts straight into the batch for the hashing thread,
                // then copies to `out`: one copy, as inline.
                pipe.seal_into(&self.cipher, &nonce, &self.header, plain, out);
            }
            Hashing::Moving => unreachable!("the hasher is always put back"),
        }
        self.sealed_len += (out.len() - start) as u64;
        self.next_index += 1;
    }
}

/// Seals `plaintext` in one go with a fresh salt and nonce prefix. Returns
/// the blob and its name.
pub fn seal_all(
    key: &DataKey,
    asset_id: &str,
    key_id: u32,
    segment_size: u32,
    plaintext: &[u8],
) -> (Vec<u8>, BlobId) {
    finish_all(Sealer::new(key, asset_id, key_id, segment_size), plaintext)
}

/// Seals deterministically with a chosen salt and nonce prefix: for test
/// vectors only. Never reuse a salt with the same data key and asset.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn seal_with_params(
    key: &DataKey,
    asset_id: &str,
    key_id: u32,
    segment_size: u32,
    salt: [u8; SALT_LEN],
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    plaintext: &[u8],
) -> (Vec<u8>, BlobId) {
    let sealer = Sealer::with_params(key, asset_id, key_id, segment_size, salt, nonce_prefix);
    finish_all(sealer, plaintext)
}

fn finish_all(mut sealer: Sealer, plaintext: &[u8]) -> (Vec<u8>, BlobId) {
    let mut out = Vec::with_capacity(
        super::SealedLayout::for_plaintext(sealer.segment_size as u32, plaintext.len() as u64)
            .map_or(0, |l| l.sealed_len() as usize),
    );
    sealer.update(plaintext, &mut out);
    let (id, len) = sealer.finish(&mut out);
    debug_assert_eq!(len, out.len() as u64);
    (out, id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::{open_all, SealedLayout, DEFAULT_SEGMENT_SIZE};

    /// Past `PIPELINE_AFTER` the hash is computed on another thread; the
    /// blob and its name must be exactly what one thread produces.
    #[test]
    fn hashing_on_a_helper_thread_gives_the_same_blob_and_name() {
        let key = DataKey::from_bytes([9; 32]);
        let seg = DEFAULT_SEGMENT_SIZE;
        let len = 3 * PIPELINE_BATCH + 12_345;
        let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        let (whole, id) = seal_with_params(&key, "a", 1, seg, [1; 32], [2; 7], &plain);
        assert_eq!(id, BlobId::of(&whole));
        let layout = SealedLayout::for_plaintext(seg, len as u64).unwrap();
        assert_eq!(whole.len() as u64, layout.sealed_len());

        // Odd chunk sizes through `update`, with `out` drained as we go.
        let mut sealer = Sealer::with_params(&key, "a", 1, seg, [1; 32], [2; 7]);
        let (mut out, mut all) = (Vec::new(), Vec::new());
        for chunk in plain.chunks(100_003) {
            sealer.update(chunk, &mut out);
            all.append(&mut out);
        }
        if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
            assert!(matches!(sealer.hasher, Hashing::Piped(_)));
        }
        let (id2, len2) = sealer.finish(&mut out);
        all.append(&mut out);
        assert_eq!((id2, len2), (id, whole.len() as u64));
        assert!(all == whole);
        assert!(open_all(&key, "a", &whole).unwrap() == plain);

        // Small blobs and tiny segments never start a thread.
        let mut small = Sealer::with_params(&key, "a", 1, 16, [1; 32], [2; 7]);
        small.update(&plain[..PIPELINE_AFTER as usize + 100], &mut out);
        assert!(matches!(small.hasher, Hashing::Inline(_)));
    }

    #[test]
    fn dropping_a_piped_sealer_midway_stops_its_thread() {
        let key = DataKey::from_bytes([9; 32]);
        let mut sealer = Sealer::new(&key, "a", 1, DEFAULT_SEGMENT_SIZE);
        let mut out = Vec::new();
        sealer.update(&vec![0; 2 * PIPELINE_AFTER as usize], &mut out);
        // What dropping the sealer does: the sender goes, the thread ends.
        let Hashing::Piped(HashPipe { tx, worker, .. }) =
            std::mem::replace(&mut sealer.hasher, Hashing::Moving)
        else {
            return; // one core: no helper thread
        };
        drop(sealer);
        drop(tx);
        worker
            .join()
            .expect("the thread ends once its channel closes");
    }
}
