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

    /// Audio-only input; rejected until audio-only media is supported.
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
        }
    }

    /// Technical detail for logs (never shown to uploaders).
    pub fn detail(&self) -> Option<String> {
        match self {
            MediaError::Init { detail }
            | MediaError::NotMedia { detail }
            | MediaError::CorruptMedia { detail }
            | MediaError::TranscodeFailed { detail } => Some(detail.clone()),
            MediaError::Io { source } => Some(source.to_string()),
            MediaError::UnsupportedCodec { codec } => Some(format!("codec: {codec}")),
            _ => None,
        }
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
