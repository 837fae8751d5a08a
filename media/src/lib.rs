//! In-process media probing and transcoding for user video uploads.
//!
//! Why in-process (ffmpeg-next bindings) instead of spawning the `ffmpeg`
//! CLI: we need structured errors an uploader can act on, fine-grained
//! progress and cooperative cancellation, and no dependence on a binary and
//! its output format being present at runtime. The price is that we own the
//! decode → filter → encode → mux loop, which lives in `transcode`.
//!
//! The output format is fixed by the consumer: the Second Life viewer plays
//! media through LibVLC, so we always produce a conservative, progressive
//! MP4 (H.264 yuv420p + AAC-LC stereo 48 kHz, `moov` before `mdat`).
//!
//! Layout: `probe` (open an upload safely and describe it), `limits`
//! (the site's acceptance policy on a probe result), `transcode` (remux or
//! re-encode to the Second Life profile), `poster` (a JPEG still for web
//! pages), `sniff` (byte-level checks before FFmpeg parses anything) and
//! `error` (one error type with stable codes). The operator-facing story is
//! in `docs/media.md`.
//!
//! A crate of its own, with no dependency on the manager: the manager's
//! pipeline and the coming separate transcode workers both use it.

mod check;
mod error;
mod limits;
mod poster;
mod probe;
mod sniff;
mod transcode;

pub use check::{check_output, Expected};
pub use error::{human_bytes, MediaError};
pub use limits::{validate, Limits, MAX_OUTPUT_DIMENSION};
pub use poster::{default_poster_secs, poster};
pub use probe::{probe, AudioInfo, ProbeInfo, VideoInfo, MAX_INPUT_DIMENSION, MAX_INPUT_PIXELS};
pub use transcode::{transcode, Profile, TranscodeOutput};

use std::sync::OnceLock;

use ffmpeg_next as ffmpeg;

/// Initialise FFmpeg once per process and silence its stderr chatter.
///
/// FFmpeg logs every recoverable glitch in user files at warning level to
/// stderr, which would flood server logs with noise we cannot act on; we keep
/// only errors and report problems through [`MediaError`] instead. Safe to call
/// repeatedly and from several threads; `probe`/`transcode` call it themselves.
pub fn init() -> Result<(), MediaError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        ffmpeg::init().map_err(|e| e.to_string())?;
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Error);
        Ok(())
    })
    .clone()
    .map_err(|detail| MediaError::Init { detail })
}
