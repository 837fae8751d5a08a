//! Cheap inspection of an upload before (or instead of) transcoding it.
//!
//! Probing only reads container headers plus the little data
//! `avformat_find_stream_info` needs, so it is safe to run synchronously in a
//! request handler to reject bad uploads early with a precise error code.
//! Opening/classifying input files is shared with `transcode` so that both
//! report the same error for the same broken file.

use std::ffi::CString;
use std::io::Read;
use std::path::Path;

use super::MediaError;
use ffmpeg::{format, media};
use ffmpeg_next as ffmpeg;

/// What an upload contains. Only the "best" (default) video and audio
/// streams are described, because those are the ones we transcode.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeInfo {
    /// Container short name, e.g. `mp4`, `mov`, `webm`, `matroska`.
    pub container: String,
    /// 0.0 when the container does not know its duration.
    pub duration_secs: f64,
    pub video: Option<VideoInfo>,
    pub audio: Option<AudioInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    pub codec: String,
    /// Coded (stored) size, *before* applying `rotation`.
    pub width: u32,
    pub height: u32,
    /// Average frame rate; 0.0 if unknown.
    pub frame_rate: f64,
    /// Clockwise degrees a player must rotate the picture by for display
    /// (phone footage): one of 0, 90, 180, 270.
    pub rotation: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AudioInfo {
    pub codec: String,
    pub sample_rate: u32,
    pub channels: u16,
}

/// Describe the media file at `path`.
pub fn probe(path: &Path) -> Result<ProbeInfo, MediaError> {
    super::init()?;
    let ictx = open_input(path)?;

    let video = ictx.streams().best(media::Type::Video).map(|st| {
        let par = st.parameters();
        let (width, height) = unsafe {
            let p = par.as_ptr();
            ((*p).width.max(0) as u32, (*p).height.max(0) as u32)
        };
        VideoInfo {
            codec: par.id().name().to_string(),
            width,
            height,
            frame_rate: stream_fps(&st).unwrap_or(0.0),
            rotation: stream_rotation(&st),
        }
    });
    let audio = ictx.streams().best(media::Type::Audio).map(|st| {
        let par = st.parameters();
        let (sample_rate, channels) = unsafe {
            let p = par.as_ptr();
            (
                (*p).sample_rate.max(0) as u32,
                (*p).ch_layout.nb_channels.max(0) as u16,
            )
        };
        AudioInfo {
            codec: par.id().name().to_string(),
            sample_rate,
            channels,
        }
    });

    Ok(ProbeInfo {
        container: container_name(&ictx, path),
        duration_secs: input_duration_secs(&ictx).unwrap_or(0.0),
        video,
        audio,
    })
}

/// Open `path` for demuxing and map every failure to an uploader-facing
/// error. Also rejects containers without audio/video (e.g. a text file that
/// FFmpeg's weak subtitle probers happily "recognise").
pub(crate) fn open_input(path: &Path) -> Result<format::context::Input, MediaError> {
    let meta = std::fs::metadata(path).map_err(|source| MediaError::Io { source })?;
    if !meta.is_file() {
        return Err(MediaError::Io {
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    if meta.len() == 0 {
        return Err(MediaError::EmptyFile);
    }

    let ictx = match format::input(path) {
        Ok(ictx) => ictx,
        Err(ffmpeg::Error::Other { errno }) if IO_ERRNOS.contains(&errno) => {
            // POSIX errors from the file protocol are real I/O problems.
            return Err(MediaError::Io {
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        Err(err) => {
            // FFmpeg picks the demuxer partly by extension, so "invalid data"
            // is ambiguous: a renamed text file and a truncated MP4 both fail
            // in mov's parser. Re-probe on content alone to tell them apart.
            return Err(if content_looks_like_media(path) {
                MediaError::corrupt("open input", err)
            } else {
                MediaError::NotMedia {
                    detail: err.to_string(),
                }
            });
        }
    };

    let has_av = ictx.streams().any(|st| {
        matches!(
            st.parameters().medium(),
            media::Type::Video | media::Type::Audio
        )
    });
    if !has_av {
        let score = unsafe { (*ictx.as_ptr()).probe_score };
        return Err(if score < MIN_CONFIDENT_SCORE {
            MediaError::NotMedia {
                detail: format!("guessed as {} with score {score}", ictx.format().name()),
            }
        } else {
            MediaError::NoStreams
        });
    }
    Ok(ictx)
}

/// AVPROBE_SCORE_MAX / 4: below this a detection is a guess (text formats).
const MIN_CONFIDENT_SCORE: i32 = 25;

/// EPERM, ENOENT, EIO, EACCES, EISDIR: errors that mean "could not read",
/// not "read but could not understand".
const IO_ERRNOS: [i32; 5] = [1, 2, 5, 13, 21];

/// Does the start of the file look like a known container, ignoring the
/// file name?
fn content_looks_like_media(path: &Path) -> bool {
    const PROBE_BYTES: usize = 64 * 1024;
    let mut buf = Vec::with_capacity(PROBE_BYTES + ffmpeg::ffi::AVPROBE_PADDING_SIZE as usize);
    let read =
        std::fs::File::open(path).and_then(|f| f.take(PROBE_BYTES as u64).read_to_end(&mut buf));
    if read.is_err() || buf.is_empty() {
        return false;
    }
    let len = buf.len();
    // FFmpeg probers may read past the end; padding must be zeroed.
    buf.resize(len + ffmpeg::ffi::AVPROBE_PADDING_SIZE as usize, 0);
    let filename = CString::new("").unwrap();
    let pd = ffmpeg::ffi::AVProbeData {
        filename: filename.as_ptr(),
        buf: buf.as_mut_ptr(),
        buf_size: len as i32,
        mime_type: std::ptr::null(),
    };
    let mut score = 0;
    let fmt = unsafe { ffmpeg::ffi::av_probe_input_format3(&pd, 1, &mut score) };
    !fmt.is_null() && score >= MIN_CONFIDENT_SCORE
}

/// Demuxer names are lists like `mov,mp4,m4a,3gp,3g2,mj2`; prefer the entry
/// matching the file extension so the UI can say "mp4" or "webm".
fn container_name(ictx: &format::context::Input, path: &Path) -> String {
    let format = ictx.format();
    let full = format.name();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    full.split(',')
        .find(|n| *n == ext)
        .or_else(|| full.split(',').next())
        .unwrap_or("")
        .to_string()
}

pub(crate) fn input_duration_secs(ictx: &format::context::Input) -> Option<f64> {
    let d = ictx.duration();
    if d > 0 {
        return Some(d as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE));
    }
    ictx.streams()
        .filter_map(|st| {
            let d = st.duration();
            let tb = st.time_base();
            (d > 0 && tb.denominator() > 0).then(|| d as f64 * f64::from(tb))
        })
        .reduce(f64::max)
}

pub(crate) fn stream_fps(st: &format::stream::Stream) -> Option<f64> {
    [st.avg_frame_rate(), st.rate()]
        .into_iter()
        .find(|r| r.numerator() > 0 && r.denominator() > 0)
        .map(f64::from)
        .filter(|f| f.is_finite() && *f > 0.0 && *f <= 1000.0)
}

/// Clockwise display rotation in {0, 90, 180, 270} from the stream's display
/// matrix (FFmpeg 5.1 keeps it in per-stream side data).
pub(crate) fn stream_rotation(st: &format::stream::Stream) -> i32 {
    for sd in st.side_data() {
        if sd.kind() == ffmpeg::codec::packet::side_data::Type::DisplayMatrix
            && sd.data().len() >= 9 * 4
        {
            let ccw =
                unsafe { ffmpeg::ffi::av_display_rotation_get(sd.data().as_ptr() as *const i32) };
            if !ccw.is_finite() {
                return 0;
            }
            let cw = (-ccw).round() as i32;
            // Snap to quarter turns; arbitrary angles are not worth supporting.
            return ((cw.rem_euclid(360) + 45) / 90 * 90) % 360;
        }
    }
    0
}
