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

use super::{sniff, MediaError};
use ffmpeg::{format, media};
use ffmpeg_next as ffmpeg;

/// What an upload contains. Only the "best" (default) video and audio
/// streams are described, because those are the ones we transcode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeInfo {
    /// Container short name, e.g. `mp4`, `mov`, `webm`, `matroska`.
    pub container: String,
    /// 0.0 when the container does not know its duration.
    pub duration_secs: f64,
    pub video: Option<VideoInfo>,
    pub audio: Option<AudioInfo>,
    /// FFmpeg's full demuxer name, e.g. `mov,mp4,m4a,3gp,3g2,mj2`; this is
    /// what [`Limits::allowed_containers`](super::Limits) is matched against.
    pub format_name: String,
    /// Overall bit rate in bits/s; 0 if unknown.
    pub bit_rate: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
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
    /// Pixel format name, e.g. `yuv420p`; empty if unknown.
    pub pix_fmt: String,
    /// Codec profile name, e.g. `High`; empty if unknown.
    pub profile: String,
    /// Sample (pixel) aspect ratio, `(1, 1)` for square pixels and when the
    /// file does not say.
    pub sample_aspect_ratio: (u32, u32),
    /// Bits per second; 0 if the container does not say.
    pub bit_rate: u64,
    /// Frame count from the container index; 0 if unknown.
    pub frame_count: u64,
    /// This server's FFmpeg has a decoder for `codec`.
    pub decodable: bool,
}

impl VideoInfo {
    /// Size as shown to a viewer: pixel aspect ratio and rotation applied.
    pub fn display_size(&self) -> (u32, u32) {
        let (n, d) = self.sample_aspect_ratio;
        let sar = if n > 0 && d > 0 {
            n as f64 / d as f64
        } else {
            1.0
        };
        let w = (self.width as f64 * sar).round() as u32;
        if self.rotation == 90 || self.rotation == 270 {
            (self.height, w)
        } else {
            (w, self.height)
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AudioInfo {
    pub codec: String,
    pub sample_rate: u32,
    pub channels: u16,
    /// Codec profile name, e.g. `LC` for AAC-LC; empty if unknown.
    pub profile: String,
    /// Bits per second; 0 if unknown.
    pub bit_rate: u64,
    /// This server's FFmpeg has a decoder for `codec`.
    pub decodable: bool,
}

/// Describe the media file at `path`.
///
/// Rejects, without decoding anything: empty files, files that are not
/// media, still images, containers outside the built-in demuxer allow-list,
/// uploads that were cut off (`truncated`), and headers that claim a picture
/// larger than [`MAX_INPUT_DIMENSION`](super::MAX_INPUT_DIMENSION) or
/// [`MAX_INPUT_PIXELS`](super::MAX_INPUT_PIXELS) (decompression bombs). The
/// configurable limits are applied separately by [`validate`](super::validate).
pub fn probe(path: &Path) -> Result<ProbeInfo, MediaError> {
    super::init()?;
    // Never let a bug in our parsing of hostile input take the server down.
    std::panic::catch_unwind(|| probe_inner(path)).unwrap_or_else(|panic| {
        Err(MediaError::failed(
            "probe panicked",
            super::transcode::panic_message(&panic),
        ))
    })
}

fn probe_inner(path: &Path) -> Result<ProbeInfo, MediaError> {
    let ictx = open_input(path)?;

    let video = pick_video_stream(&ictx).map(|st| {
        let par = st.parameters();
        let (width, height, pix_fmt, profile, sar, bit_rate) = unsafe {
            let p = par.as_ptr();
            (
                (*p).width.max(0) as u32,
                (*p).height.max(0) as u32,
                (*p).format,
                profile_name((*p).codec_id, (*p).profile),
                (*p).sample_aspect_ratio,
                (*p).bit_rate.max(0) as u64,
            )
        };
        let pix_fmt = if pix_fmt >= 0 && pix_fmt < ffmpeg::ffi::AVPixelFormat::AV_PIX_FMT_NB as i32
        {
            // SAFETY: the value comes from this FFmpeg and is in range.
            unsafe {
                let name = ffmpeg::ffi::av_get_pix_fmt_name(std::mem::transmute::<
                    i32,
                    ffmpeg::ffi::AVPixelFormat,
                >(pix_fmt));
                cstr(name)
            }
        } else {
            String::new()
        };
        VideoInfo {
            codec: par.id().name().to_string(),
            width,
            height,
            frame_rate: stream_fps(&st).unwrap_or(0.0),
            rotation: stream_rotation(&st),
            pix_fmt,
            profile,
            sample_aspect_ratio: if sar.num > 0 && sar.den > 0 {
                (sar.num as u32, sar.den as u32)
            } else {
                (1, 1)
            },
            bit_rate,
            frame_count: st.frames().max(0) as u64,
            decodable: ffmpeg::decoder::find(par.id()).is_some(),
        }
    });
    let audio = ictx.streams().best(media::Type::Audio).map(|st| {
        let par = st.parameters();
        let (sample_rate, channels, profile, bit_rate) = unsafe {
            let p = par.as_ptr();
            (
                (*p).sample_rate.max(0) as u32,
                (*p).ch_layout.nb_channels.max(0) as u16,
                profile_name((*p).codec_id, (*p).profile),
                (*p).bit_rate.max(0) as u64,
            )
        };
        AudioInfo {
            codec: par.id().name().to_string(),
            sample_rate,
            channels,
            profile,
            bit_rate,
            decodable: ffmpeg::decoder::find(par.id()).is_some(),
        }
    });

    Ok(ProbeInfo {
        container: container_name(&ictx, path),
        duration_secs: input_duration_secs(&ictx).unwrap_or(0.0),
        video,
        audio,
        format_name: ictx.format().name().to_string(),
        bit_rate: ictx.bit_rate().max(0) as u64,
    })
}

fn profile_name(id: ffmpeg::ffi::AVCodecID, profile: i32) -> String {
    if profile < 0 {
        return String::new();
    }
    unsafe { cstr(ffmpeg::ffi::avcodec_profile_name(id, profile)) }
}

unsafe fn cstr(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// The "best" video stream, skipping cover art (attached pictures): an MP3
/// with album art is audio-only as far as we are concerned.
pub(crate) fn pick_video_stream(
    ictx: &format::context::Input,
) -> Option<format::stream::Stream<'_>> {
    let is_real = |s: &format::stream::Stream| {
        s.parameters().medium() == media::Type::Video
            && !s
                .disposition()
                .contains(format::stream::Disposition::ATTACHED_PIC)
    };
    match ictx.streams().best(media::Type::Video) {
        Some(s) if is_real(&s) => Some(s),
        _ => ictx.streams().find(|s| is_real(s)),
    }
}

/// [`pick_video_stream`], or the reason there is none: `no_video` when the
/// file has sound only, `no_streams` when it has neither.
pub(crate) fn require_video_stream(
    ictx: &format::context::Input,
) -> Result<format::stream::Stream<'_>, MediaError> {
    pick_video_stream(ictx).ok_or_else(|| {
        if ictx.streams().best(media::Type::Audio).is_some() {
            MediaError::NoVideo
        } else {
            MediaError::NoStreams
        }
    })
}

/// Demuxers FFmpeg may use on uploads (`format_whitelist`). Everything else
/// is refused before its parser runs. This is a security boundary, not just
/// policy: playlist-style demuxers (`hls`, `concat`, `image2` patterns…) open
/// *other* files or URLs named inside the upload, the classic way to make a
/// transcoder leak `/etc/passwd` into a video. Audio-only formats are here so
/// an MP3 upload is answered with `no_video` rather than "not accepted".
/// [`Limits::allowed_containers`](super::Limits) can only narrow this list.
pub(crate) const DEMUXER_ALLOW_LIST: &str =
    "mov,matroska,avi,flv,mpegts,ogg,mpeg,asf,mp3,aac,wav,flac";

/// Largest width or height any upload may *claim*, configurable limits
/// notwithstanding (8K is 7680 wide).
pub const MAX_INPUT_DIMENSION: u32 = 8192;
/// Largest picture area (pixels) any upload may claim: 2^25 ≈ 33.5 M, just
/// above 8K UHD (7680x4320). Also given to decoders as `max_pixels`, so a
/// stream that changes size mid-way cannot make them allocate more.
pub const MAX_INPUT_PIXELS: u64 = 1 << 25;

fn check_claimed_dims(width: u32, height: u32) -> Result<(), MediaError> {
    if width > MAX_INPUT_DIMENSION
        || height > MAX_INPUT_DIMENSION
        || u64::from(width) * u64::from(height) > MAX_INPUT_PIXELS
    {
        return Err(MediaError::TooWide {
            width,
            height,
            max_width: MAX_INPUT_DIMENSION,
            max_height: MAX_INPUT_DIMENSION,
        });
    }
    Ok(())
}

fn check_stream_dims(ictx: &format::context::Input) -> Result<(), MediaError> {
    for st in ictx.streams() {
        let par = st.parameters();
        // Cover art is never decoded by us (and find_stream_info decodes it
        // under `max_pixels`); a big album cover must not reject an upload.
        if par.medium() != media::Type::Video
            || st
                .disposition()
                .contains(format::stream::Disposition::ATTACHED_PIC)
        {
            continue;
        }
        let (w, h) = unsafe {
            let p = par.as_ptr();
            ((*p).width.max(0) as u32, (*p).height.max(0) as u32)
        };
        check_claimed_dims(w, h)?;
    }
    Ok(())
}

/// Open `path` for demuxing and map every failure to an uploader-facing
/// error. Also rejects containers without audio/video (e.g. a text file that
/// FFmpeg's weak subtitle probers happily "recognise").
///
/// Order matters: byte-level checks (truncation, still images, y4m bombs)
/// first; then the demuxer reads headers only and claimed picture sizes are
/// checked; only then does `avformat_find_stream_info` decode a few frames,
/// with decoders capped at [`MAX_INPUT_PIXELS`].
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

    let found = sniff::sniff(path, meta.len()).map_err(|source| MediaError::Io { source })?;
    if let Some((w, h)) = found.claimed_dims {
        check_claimed_dims(w, h)?;
    }
    if let Some(format) = found.still_image {
        return Err(MediaError::StillImage {
            format: format.to_string(),
        });
    }
    if let Some(detail) = found.truncated {
        return Err(MediaError::Truncated { detail });
    }

    let mut ictx = match open_headers(path) {
        Ok(ictx) => ictx,
        Err(OpenError::Path(source)) => return Err(MediaError::Io { source }),
        Err(OpenError::Ffmpeg(ffmpeg::Error::Other { errno })) if IO_ERRNOS.contains(&errno) => {
            // POSIX errors from the file protocol are real I/O problems.
            return Err(MediaError::Io {
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        Err(OpenError::Ffmpeg(err)) => return Err(classify_unopenable(path, err)),
    };
    check_stream_dims(&ictx)?;
    if let Err(err) = find_stream_info(&mut ictx) {
        return Err(classify_unopenable(path, err));
    }
    // Decoders may have learnt the real size from the bitstream.
    check_stream_dims(&ictx)?;

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

enum OpenError {
    Path(std::io::Error),
    Ffmpeg(ffmpeg::Error),
}

/// `avformat_open_input` only (headers), restricted to local files and to
/// [`DEMUXER_ALLOW_LIST`]. Unlike `ffmpeg_next::format::input` this does not
/// panic on non-UTF-8 paths, and does not treat `x:` in a file name as a
/// protocol.
fn open_headers(path: &Path) -> Result<format::context::Input, OpenError> {
    use std::os::unix::ffi::OsStrExt;
    let mut url = b"file:".to_vec();
    url.extend_from_slice(path.as_os_str().as_bytes());
    let url = CString::new(url)
        .map_err(|e| OpenError::Path(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut opts = ffmpeg::Dictionary::new();
    opts.set("protocol_whitelist", "file");
    opts.set("format_whitelist", DEMUXER_ALLOW_LIST);
    unsafe {
        let mut ps = std::ptr::null_mut();
        let mut raw = opts.disown();
        let ret =
            ffmpeg::ffi::avformat_open_input(&mut ps, url.as_ptr(), std::ptr::null(), &mut raw);
        drop(ffmpeg::Dictionary::own(raw));
        if ret < 0 {
            // avformat_open_input frees the context on failure.
            return Err(OpenError::Ffmpeg(ffmpeg::Error::from(ret)));
        }
        Ok(format::context::Input::wrap(ps))
    }
}

/// `avformat_find_stream_info` with every decoder it opens capped at
/// [`MAX_INPUT_PIXELS`] (`max_pixels`), so a bitstream that disagrees with
/// its container header cannot make the probe allocate a huge frame.
fn find_stream_info(ictx: &mut format::context::Input) -> Result<(), ffmpeg::Error> {
    unsafe {
        let n = (*ictx.as_ptr()).nb_streams as usize;
        let mut dicts: Vec<*mut ffmpeg::ffi::AVDictionary> = vec![std::ptr::null_mut(); n];
        let key = CString::new("max_pixels").unwrap();
        let val = CString::new(MAX_INPUT_PIXELS.to_string()).unwrap();
        for d in dicts.iter_mut() {
            ffmpeg::ffi::av_dict_set(d, key.as_ptr(), val.as_ptr(), 0);
        }
        let ret = ffmpeg::ffi::avformat_find_stream_info(ictx.as_mut_ptr(), dicts.as_mut_ptr());
        for d in dicts.iter_mut() {
            ffmpeg::ffi::av_dict_free(d);
        }
        if ret < 0 {
            Err(ffmpeg::Error::from(ret))
        } else {
            Ok(())
        }
    }
}

/// FFmpeg picks the demuxer partly by extension, so "invalid data" is
/// ambiguous: a renamed text file, a JPEG renamed `.mp4`, a format outside
/// the allow-list and a damaged MP4 all fail the same way. Re-probe on content
/// alone to tell them apart.
fn classify_unopenable(path: &Path, err: ffmpeg::Error) -> MediaError {
    let Some(name) = content_format(path) else {
        return MediaError::NotMedia {
            detail: err.to_string(),
        };
    };
    if is_image_demuxer(&name) {
        return MediaError::StillImage { format: name };
    }
    let allowed = name
        .split(',')
        .any(|n| DEMUXER_ALLOW_LIST.split(',').any(|a| a == n));
    if !allowed {
        return MediaError::ContainerNotAllowed {
            container: name.split(',').next().unwrap_or_default().to_string(),
        };
    }
    MediaError::corrupt("open input", format!("{name}: {err}"))
}

/// `jpeg_pipe`, `png_pipe`, `webp_pipe`, … and the `image2` sequence demuxer.
pub(crate) fn is_image_demuxer(name: &str) -> bool {
    name.split(',')
        .any(|n| n.ends_with("_pipe") || n == "image2" || n == "image2pipe")
}

/// AVPROBE_SCORE_MAX / 4: below this a detection is a guess (text formats).
const MIN_CONFIDENT_SCORE: i32 = 25;

/// EPERM, ENOENT, EIO, EACCES, EISDIR: errors that mean "could not read",
/// not "read but could not understand".
const IO_ERRNOS: [i32; 5] = [1, 2, 5, 13, 21];

/// The demuxer FFmpeg would pick for the start of the file on content
/// alone (ignoring the name and the allow-list), if it is confident.
fn content_format(path: &Path) -> Option<String> {
    const PROBE_BYTES: usize = 64 * 1024;
    let mut buf = Vec::with_capacity(PROBE_BYTES + ffmpeg::ffi::AVPROBE_PADDING_SIZE as usize);
    let read =
        std::fs::File::open(path).and_then(|f| f.take(PROBE_BYTES as u64).read_to_end(&mut buf));
    if read.is_err() || buf.is_empty() {
        return None;
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
    if fmt.is_null() || score < MIN_CONFIDENT_SCORE {
        return None;
    }
    Some(unsafe { cstr((*fmt).name) })
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
