//! One error type for the whole media pipeline.
//!
//! Uploads fail for reasons the uploader can fix (wrong file, empty file,
//! audio-only file) and for reasons they cannot (encoder failure). The web
//! layer needs a *stable* machine code to branch on and localise, and a plain
//! sentence it can show as-is, so every variant carries both. FFmpeg's own
//! error text is kept in `detail` fields for logs only: it is too technical
//! (and sometimes leaks paths) to show to an uploader.

use std::fmt;

/// Why probing or transcoding failed. Match on [`MediaError::code`] rather
/// than on variants across a serialisation boundary: codes never change.
#[derive(thiserror::Error, Debug)]
pub enum MediaError {
    /// FFmpeg could not be initialised (broken shared libraries).
    #[error("The media system could not be started on the server.")]
    Init { detail: String },

    /// The file could not be read at all (missing, permissions, I/O error).
    #[error("The uploaded file could not be read.")]
    Io {
        #[source]
        source: std::io::Error,
    },

    /// Zero-byte upload: usually an aborted upload or a client bug.
    #[error("The uploaded file is empty.")]
    EmptyFile,

    /// The bytes are not any container FFmpeg recognises (e.g. a text or
    /// office document renamed to `.mp4`).
    #[error("The uploaded file is not a video or audio file.")]
    NotMedia { detail: String },

    /// The bytes look like a known container but are damaged or truncated
    /// badly enough that nothing usable could be decoded.
    #[error("The uploaded video appears to be damaged or incomplete.")]
    CorruptMedia { detail: String },

    /// A valid container with neither an audio nor a video stream.
    #[error("The uploaded file contains no video or audio.")]
    NoStreams,

    /// Audio-only input (including an MP3 with cover art). Rejected on
    /// purpose: Second Life media shows a picture; see docs/media.md.
    #[error("The uploaded file contains only audio; please upload a video.")]
    NoVideo,

    /// The stream uses a codec this server's FFmpeg cannot decode.
    #[error("The uploaded video uses a format that is not supported.")]
    UnsupportedCodec { codec: String },

    /// Anything that went wrong on our side while encoding or writing.
    #[error("The video could not be converted.")]
    TranscodeFailed { detail: String },

    /// The caller asked us to stop.
    #[error("The conversion was cancelled.")]
    Cancelled,

    /// The upload is bigger than [`Limits::max_bytes`](super::Limits).
    #[error(
        "The uploaded file is too large ({}); the maximum is {}.",
        human_bytes(*bytes),
        human_bytes(*max)
    )]
    TooLarge { bytes: u64, max: u64 },

    /// The movie runs longer than [`Limits::max_duration_secs`](super::Limits).
    #[error(
        "The video is too long ({}); the maximum is {}.",
        human_secs(*secs),
        human_secs(*max)
    )]
    TooLong { secs: f64, max: f64 },

    /// The picture (as stored, or as claimed by a header) exceeds the size
    /// limits. Also the answer to "decompression bombs": headers claiming
    /// enormous dimensions are rejected before anything is decoded.
    #[error(
        "The video picture is too large ({width}x{height} pixels); \
         the maximum is {max_width}x{max_height}."
    )]
    TooWide {
        width: u32,
        height: u32,
        max_width: u32,
        max_height: u32,
    },

    /// A recognised container that this server does not accept.
    #[error(
        "This kind of file ({container}) is not accepted; \
         please upload a video such as MP4, MOV, MKV or WebM."
    )]
    ContainerNotAllowed { container: String },

    /// A photo or other single picture (e.g. a JPEG renamed `.mp4`).
    #[error("The uploaded file is a still image, not a video.")]
    StillImage { format: String },

    /// The file ends before its own structure says it should: almost always
    /// an upload or copy that was cut off midway.
    #[error(
        "The uploaded file is incomplete (it seems to have been cut off); please upload it again."
    )]
    Truncated { detail: String },
}

impl MediaError {
    /// Stable snake_case identifier, safe to store and to branch on.
    pub fn code(&self) -> &'static str {
        match self {
            MediaError::Init { .. } => "init_failed",
            MediaError::Io { .. } => "io_error",
            MediaError::EmptyFile => "empty_file",
            MediaError::NotMedia { .. } => "not_media",
            MediaError::CorruptMedia { .. } => "corrupt_media",
            MediaError::NoStreams => "no_streams",
            MediaError::NoVideo => "no_video",
            MediaError::UnsupportedCodec { .. } => "unsupported_codec",
            MediaError::TranscodeFailed { .. } => "transcode_failed",
            MediaError::Cancelled => "cancelled",
            MediaError::TooLarge { .. } => "too_large",
            MediaError::TooLong { .. } => "too_long",
            MediaError::TooWide { .. } => "too_wide",
            MediaError::ContainerNotAllowed { .. } => "container_not_allowed",
            MediaError::StillImage { .. } => "still_image",
            MediaError::Truncated { .. } => "truncated",
        }
    }

    /// Technical detail for logs (never shown to uploaders).
    pub fn detail(&self) -> Option<String> {
        match self {
            MediaError::Init { detail }
            | MediaError::NotMedia { detail }
            | MediaError::CorruptMedia { detail }
            | MediaError::TranscodeFailed { detail }
            | MediaError::Truncated { detail } => Some(detail.clone()),
            MediaError::StillImage { format } => Some(format!("format: {format}")),
            MediaError::Io { source } => Some(source.to_string()),
            MediaError::UnsupportedCodec { codec } => Some(format!("codec: {codec}")),
            _ => None,
        }
    }

    /// Every code [`code`](Self::code) can return, for documentation and
    /// for callers that keep a table of translations.
    pub const ALL_CODES: &'static [&'static str] = &[
        "init_failed",
        "io_error",
        "empty_file",
        "not_media",
        "corrupt_media",
        "truncated",
        "no_streams",
        "no_video",
        "still_image",
        "container_not_allowed",
        "too_large",
        "too_long",
        "too_wide",
        "unsupported_codec",
        "transcode_failed",
        "cancelled",
    ];

    /// True when the uploader caused the failure (the file, not the server):
    /// retrying the same file will fail the same way.
    pub fn is_user_error(&self) -> bool {
        !matches!(
            self,
            MediaError::Init { .. }
                | MediaError::Io { .. }
                | MediaError::TranscodeFailed { .. }
                | MediaError::Cancelled
        )
    }

    pub(crate) fn failed(what: &str, err: impl fmt::Display) -> Self {
        MediaError::TranscodeFailed {
            detail: format!("{what}: {err}"),
        }
    }

    pub(crate) fn corrupt(what: &str, err: impl fmt::Display) -> Self {
        MediaError::CorruptMedia {
            detail: format!("{what}: {err}"),
        }
    }
}

/// `1.5 GiB`, `200 MiB`, `12 KiB`, `10 bytes`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            let v = n as f64 / size as f64;
            return if v >= 10.0 || v.fract() < 0.05 {
                format!("{v:.0} {unit}")
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{n} bytes")
}

/// `4 h 0 min`, `12 min 5 s`, `42 s`.
fn human_secs(s: f64) -> String {
    let s = if s.is_finite() {
        s.max(0.0).round() as u64
    } else {
        0
    };
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec} s"),
        (0, min, sec) => format!("{min} min {sec} s"),
        (h, min, _) => format!("{h} h {min} min"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(10), "10 bytes");
        assert_eq!(human_bytes(2 << 30), "2 GiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_secs(42.4), "42 s");
        assert_eq!(human_secs(725.0), "12 min 5 s");
        assert_eq!(human_secs(4.0 * 3600.0), "4 h 0 min");
    }

    #[test]
    fn every_code_is_listed() {
        let samples = [
            MediaError::EmptyFile,
            MediaError::NoVideo,
            MediaError::Truncated {
                detail: String::new(),
            },
            MediaError::TooWide {
                width: 1,
                height: 1,
                max_width: 1,
                max_height: 1,
            },
            MediaError::StillImage {
                format: String::new(),
            },
        ];
        for e in samples {
            assert!(MediaError::ALL_CODES.contains(&e.code()), "{}", e.code());
            assert!(e.to_string().ends_with('.'), "{e}");
        }
    }
}
