//! Sealed-blob throughput (issue 3, item 6).
//!
//! `scripts/bench seal` runs this beside `openssl speed` and prints the ratios
//! against the targets in `docs/sealed-blob.md` ("Performance"). Groups:
//!
//! - `seal/stream_64k`: [`Sealer::update`] fed 64 KiB chunks, as
//!   `SealReader` does on an upload (AES-256-GCM + SHA-256 of the output).
//!   Past 256 KiB the SHA-256 runs on a helper thread (both cores).
//! - `seal/seal_all`: the same plaintext in one call.
//! - `seal/one_thread`: blobs of 3 segments, under the 256 KiB at which the
//!   helper thread starts: seal on one core.
//! - `open/segments`: every segment of a blob through
//!   [`Opener::open_segment_into`] (authenticate + decrypt only).
//! - `open/range_1MiB_mid`: [`open_range`] of 1 MiB from the middle of the
//!   blob, unaligned, through the `RangeRead` seam.
//! - `ref/aes256gcm_64k`, `ref/sha256`: the raw crates on the same bytes,
//!   so the format's own overhead is visible.
//!
//! Throughput is plaintext bytes per second. Before measuring it prints
//! which CPU features are present and which backend the crypto crates
//! pick at run time (see `print_hardware_paths`).

use std::hint::black_box;
use std::time::Duration;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shared::{open_range, seal_all, DataKey, Opener, Sealer, DEFAULT_SEGMENT_SIZE};

/// Plaintext per iteration: a short movie. Sealing starts its hashing
/// thread after the first 256 KiB and ends by waiting for the last
/// batches to be hashed; on 16 MiB that fill and drain cost ~5 % of the
/// two-core figure, on a real movie (hundreds of MB) well under 1 %.
const PLAIN_LEN: usize = 64 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
const ASSET: &str = "bench-asset";

fn plaintext() -> Vec<u8> {
    (0..PLAIN_LEN).map(|i| (i * 31 % 251) as u8).collect()
}

fn key() -> DataKey {
    DataKey::from_bytes([0x42; 32])
}

/// Prints what the machine offers and what the crates use. The crates
/// decide at run time with `cpufeatures` (CPUID plus the OS's XSAVE state),
/// so no `target-cpu` flag is needed and the binaries still run elsewhere:
/// - aes 0.9.1 (`src/x86.rs`, `src/autodetect.rs`):
///   `cpufeatures::new!(features_aes, "aes")` picks AES-NI, 8 blocks in
///   parallel, else the constant-time fixslice software. Its VAES backends
///   are compiled only with `--cfg aes_backend="avx256"`/`"avx512"` (and
///   were no faster here); aes 0.9.4 detects VAES at run time (~15% more
///   AES-GCM here) but needs zeroize 1.9 (we pin 1.8.1) and Rust 1.89.
///   Forced soft by `--cfg aes_backend="soft"`.
/// - polyval 0.7.3, GHASH's engine (`src/backend/intrinsics/x86.rs`):
///   `cpufeatures::new!(clmul, "avx", "pclmulqdq")`. Forced soft by
///   `--cfg polyval_backend="soft"`.
/// - sha2 0.10.9 (`src/sha256/x86.rs`): `cpufeatures::new!(shani_cpuid,
///   "sha", "sse2", "ssse3", "sse4.1")`, SHA-NI intrinsics, on by default.
///   The `asm` feature only swaps the *fallback* for sha2-asm (no SHA-NI
///   in it), so it is not used. Forced soft by the `force-soft` feature
///   (shared's `bench-soft-sha2`).
fn print_hardware_paths() {
    println!("== hardware paths ==");
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        let f = [
            ("aes", std::arch::is_x86_feature_detected!("aes")),
            (
                "pclmulqdq",
                std::arch::is_x86_feature_detected!("pclmulqdq"),
            ),
            ("avx", std::arch::is_x86_feature_detected!("avx")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("vaes", std::arch::is_x86_feature_detected!("vaes")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("sha", std::arch::is_x86_feature_detected!("sha")),
            ("sse4.1", std::arch::is_x86_feature_detected!("sse4.1")),
            ("ssse3", std::arch::is_x86_feature_detected!("ssse3")),
        ];
        let has = |name: &str| f.iter().any(|(n, v)| *n == name && *v);
        let line: Vec<String> = f.iter().map(|(n, v)| format!("{n}={v}")).collect();
        println!("cpu: {}", line.join(" "));
        let aes_soft = cfg!(aes_backend = "soft");
        let polyval_soft = cfg!(polyval_backend = "soft");
        let sha_soft = cfg!(feature = "bench-soft-sha2");
        let aes = if aes_soft || !has("aes") {
            "soft (fixslice)"
        } else {
            "AES-NI (x86 ni backend, 8 blocks in parallel)"
        };
        let ghash = if !polyval_soft && has("avx") && has("pclmulqdq") {
            "CLMUL (pclmulqdq)"
        } else {
            "soft"
        };
        let sha = if !sha_soft && has("sha") && has("sse4.1") && has("ssse3") {
            "SHA-NI intrinsics"
        } else {
            "soft"
        };
        println!("backend: aes={aes} ghash={ghash} sha256={sha}");
        println!(
            "forced soft: aes_backend={aes_soft} polyval_backend={polyval_soft} sha2/force-soft={sha_soft}"
        );
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    println!("not x86: backends are the crates' defaults for this arch");
}

fn seal_benches(c: &mut Criterion) {
    let plain = plaintext();
    let key = key();
    let mut g = c.benchmark_group("seal");
    g.throughput(Throughput::Bytes(PLAIN_LEN as u64));
    let mut out = Vec::with_capacity(PLAIN_LEN + PLAIN_LEN / 1024 + 1024);
    g.bench_function("stream_64k", |b| {
        b.iter(|| {
            out.clear();
            let mut sealer = Sealer::new(&key, ASSET, 1, DEFAULT_SEGMENT_SIZE);
            for chunk in plain.chunks(CHUNK) {
                sealer.update(chunk, &mut out);
            }
            black_box(sealer.finish(&mut out))
        })
    });
    g.bench_function("seal_all", |b| {
        b.iter(|| black_box(seal_all(&key, ASSET, 1, DEFAULT_SEGMENT_SIZE, &plain)))
    });
    // Blobs under 256 KiB are hashed on the sealing thread itself: this is
    // the one-core figure (3 segments, 196 608 bytes per blob).
    let small = &plain[..3 * CHUNK];
    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("one_thread", |b| {
        b.iter(|| {
            out.clear();
            let mut sealer = Sealer::new(&key, ASSET, 1, DEFAULT_SEGMENT_SIZE);
            for chunk in small.chunks(CHUNK) {
                sealer.update(chunk, &mut out);
            }
            black_box(sealer.finish(&mut out))
        })
    });
    g.finish();
}

fn open_benches(c: &mut Criterion) {
    let plain = plaintext();
    let key = key();
    let (sealed, _) = seal_all(&key, ASSET, 1, DEFAULT_SEGMENT_SIZE, &plain);
    let opener = Opener::new(&key, ASSET, &sealed, sealed.len() as u64).expect("header");
    let layout = *opener.layout();

    let mut g = c.benchmark_group("open");
    g.throughput(Throughput::Bytes(PLAIN_LEN as u64));
    let mut buf = Vec::with_capacity(DEFAULT_SEGMENT_SIZE as usize);
    g.bench_function("segments", |b| {
        b.iter(|| {
            for i in 0..layout.segment_count() {
                let r = layout.sealed_range(i);
                opener
                    .open_segment_into(i, &sealed[r.start as usize..r.end as usize], &mut buf)
                    .expect("authentic");
                black_box(&buf);
            }
        })
    });

    // 1 MiB from the middle, starting off a segment boundary.
    let start = PLAIN_LEN as u64 / 2 + 12_345;
    let end = start + (1 << 20);
    let blob = Bytes::from(sealed.clone());
    g.throughput(Throughput::Bytes(end - start));
    g.bench_function("range_1MiB_mid", |b| {
        b.iter(|| {
            let stream = open_range(
                blob.clone(),
                key.clone(),
                ASSET.into(),
                blob.len() as u64,
                start,
                end,
            )
            .expect("bounds");
            let n = futures::executor::block_on(stream.fold(0usize, |n, part| async move {
                n + part.expect("authentic").len()
            }));
            assert_eq!(n as u64, end - start);
        })
    });
    g.finish();
}

fn reference_benches(c: &mut Criterion) {
    let plain = plaintext();
    let mut g = c.benchmark_group("ref");
    g.throughput(Throughput::Bytes(PLAIN_LEN as u64));
    let cipher = Aes256Gcm::new_from_slice(&[7; 32]).expect("32-byte key");
    let mut buf = plain.clone();
    g.bench_function("aes256gcm_64k", |b| {
        b.iter(|| {
            for (i, seg) in buf.chunks_mut(CHUNK).enumerate() {
                let mut n = [0u8; 12];
                n[..8].copy_from_slice(&(i as u64).to_be_bytes());
                let tag = cipher
                    .encrypt_inout_detached(&Nonce::from(n), b"", seg.into())
                    .expect("encrypts");
                black_box(tag);
            }
        })
    });
    g.bench_function("sha256", |b| b.iter(|| black_box(Sha256::digest(&plain))));
    g.finish();
}

fn config() -> Criterion {
    // Short by default: the machine has 2 cores and other builds run.
    // Command-line flags (--warm-up-time, --measurement-time, ...) override.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = config();
    targets = seal_benches, open_benches, reference_benches
}

fn main() {
    print_hardware_paths();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
