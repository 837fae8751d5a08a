//! A JPEG still ("poster") for web pages, taken from a video.
//!
//! Normally run on our own transcoded MP4 (so the picture matches what
//! viewers get), but it works on any input `probe` accepts: rotation and
//! non-square pixels are applied the same way as in `transcode`.
//!
//! FFmpeg 5.1's MJPEG encoder wants full-range `yuvj420p` (plain `yuv420p`
//! needs `-strict -1`), so the scaler converts to full range explicitly;
//! otherwise blacks come out grey.

use std::io::Write;
use std::path::Path;

use super::limits::MAX_OUTPUT_DIMENSION;
use super::probe::{input_duration_secs, open_input, require_video_stream, stream_rotation};
use super::transcode::{decoder_error, fit_dimensions, is_again, open_decoder, panic_message};
use super::MediaError;
use ffmpeg::{codec, encoder, format, frame, rescale, Packet, Rational, Rescale};
use ffmpeg_next as ffmpeg;

/// Where to take the poster from when the caller has no preference: 10 % into
/// the movie (past fades from black and title cards), or 1 s when the
/// duration is unknown.
pub fn default_poster_secs(duration_secs: f64) -> f64 {
    if duration_secs.is_finite() && duration_secs > 0.0 {
        duration_secs * 0.1
    } else {
        1.0
    }
}

/// Frames decoded after the seek point before we settle for the latest one.
const MAX_FRAMES_AFTER_SEEK: u32 = 600;

/// Write a JPEG of the frame at (or just after) `at_secs` of `input` to
/// `output_jpeg`, scaled down to at most `max_width` pixels wide (never up),
/// and return its size. A negative or non-finite `at_secs` means
/// [`default_poster_secs`]; a time past the end takes the last frame. The
/// file appears atomically (written beside it, then renamed).
pub fn poster(
    input_mp4: &Path,
    output_jpeg: &Path,
    at_secs: f64,
    max_width: u32,
) -> Result<(u32, u32), MediaError> {
    super::init()?;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(input_mp4, output_jpeg, at_secs, max_width)
    }))
    .unwrap_or_else(|panic| Err(MediaError::failed("panic", panic_message(&panic))));
    if let Err(err) = &result {
        tracing::warn!(?input_mp4, code = err.code(), detail = ?err.detail(), "poster failed");
    }
    result
}

fn run(
    input: &Path,
    output: &Path,
    at_secs: f64,
    max_width: u32,
) -> Result<(u32, u32), MediaError> {
    if max_width < 2 {
        return Err(MediaError::failed("poster", "max_width must be >= 2"));
    }
    let mut ictx = open_input(input)?;
    let duration = input_duration_secs(&ictx).unwrap_or(0.0);
    let target = if at_secs.is_finite() && at_secs >= 0.0 {
        at_secs
    } else {
        default_poster_secs(duration)
    };
    let target = if duration > 0.0 {
        target.min(duration)
    } else {
        target
    };

    let mut picture = grab_frame(&mut ictx, target)?;
    if picture.is_none() && target > 0.0 {
        // Seeking failed us (odd index, or target past the last frame):
        // start again from the top and take what we find.
        let mut ictx = open_input(input)?;
        picture = grab_frame(&mut ictx, 0.0)?;
    }
    let (frame, rotation) =
        picture.ok_or_else(|| MediaError::corrupt("poster", "no video frame could be decoded"))?;

    let (w, h) = fit_dimensions(
        frame.width(),
        frame.height(),
        frame.aspect_ratio(),
        rotation,
        max_width.min(MAX_OUTPUT_DIMENSION),
        MAX_OUTPUT_DIMENSION,
    );
    let scaled =
        scale_frame(&frame, rotation, w, h).map_err(|e| MediaError::failed("poster filter", e))?;
    let jpeg = encode_jpeg(&scaled)?;
    write_atomically(output, &jpeg).map_err(|source| MediaError::Io { source })?;
    Ok((w, h))
}

/// Decode the first frame at or after `target` seconds (or the last frame
/// before the end). Returns the frame and the stream's rotation.
fn grab_frame(
    ictx: &mut format::context::Input,
    target: f64,
) -> Result<Option<(frame::Video, i32)>, MediaError> {
    let vst = require_video_stream(ictx)?;
    let v_index = vst.index();
    let tb = vst.time_base();
    let rotation = stream_rotation(&vst);
    let mut dec = open_decoder(&vst)?
        .video()
        .map_err(|e| decoder_error(&vst, e))?;

    let start = unsafe { (*ictx.as_ptr()).start_time };
    let start = if start == ffmpeg::ffi::AV_NOPTS_VALUE {
        0
    } else {
        start
    };
    let target_ts = start + (target * f64::from(ffmpeg::ffi::AV_TIME_BASE)) as i64;
    if target > 0.0 {
        // Lands on the keyframe at or before the target; decode forward.
        if ictx.seek(target_ts, ..target_ts + 1).is_err() {
            tracing::debug!(target, "poster seek failed; decoding from the start");
        }
    }
    let target_in_tb = target_ts.rescale(rescale::TIME_BASE, tb);

    let mut latest: Option<frame::Video> = None;
    let mut after_seek = 0u32;
    let mut decoded = frame::Video::empty();
    let mut done = false;
    let mut errors = 0u32;
    let mut take = |dec: &mut codec::decoder::Video, latest: &mut Option<frame::Video>| -> bool {
        loop {
            match dec.receive_frame(&mut decoded) {
                Ok(()) => {
                    after_seek += 1;
                    let reached = decoded.timestamp().is_none_or(|ts| ts >= target_in_tb);
                    *latest = Some(decoded.clone());
                    if reached || after_seek >= MAX_FRAMES_AFTER_SEEK {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    };
    loop {
        let mut pkt = Packet::empty();
        match pkt.read(ictx) {
            Ok(()) => {}
            Err(ffmpeg::Error::Eof) => break,
            Err(e) => {
                errors += 1;
                if errors > 32 {
                    tracing::debug!(error = %e, "poster: giving up reading");
                    break;
                }
                continue;
            }
        }
        if pkt.stream() != v_index {
            continue;
        }
        if let Err(e) = dec.send_packet(&pkt) {
            if !is_again(&e) {
                tracing::debug!(error = %e, "poster: packet rejected by decoder");
            }
        }
        if take(&mut dec, &mut latest) {
            done = true;
            break;
        }
    }
    if !done {
        let _ = dec.send_eof();
        take(&mut dec, &mut latest);
    }
    Ok(latest.map(|f| (f, rotation)))
}

/// Rotate, scale to `w`x`h` square pixels and convert to full-range
/// `yuvj420p` for the MJPEG encoder.
fn scale_frame(
    f: &frame::Video,
    rotation: i32,
    w: u32,
    h: u32,
) -> Result<frame::Video, ffmpeg::Error> {
    let mut graph = super::transcode::build_video_graph(f, Rational(1, 25), rotation, w, h, true)?;

    let mut input = f.clone();
    input.set_pts(Some(0));
    graph
        .get("in")
        .ok_or(ffmpeg::Error::FilterNotFound)?
        .source()
        .add(&input)?;
    graph
        .get("in")
        .ok_or(ffmpeg::Error::FilterNotFound)?
        .source()
        .flush()?;
    let mut out = frame::Video::empty();
    graph
        .get("out")
        .ok_or(ffmpeg::Error::FilterNotFound)?
        .sink()
        .frame(&mut out)?;
    Ok(out)
}

fn encode_jpeg(f: &frame::Video) -> Result<Vec<u8>, MediaError> {
    let codec = encoder::find(codec::Id::MJPEG)
        .ok_or_else(|| MediaError::failed("encoder", "mjpeg encoder is not available"))?;
    let mut enc = codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .map_err(|e| MediaError::failed("mjpeg encoder", e))?;
    enc.set_width(f.width());
    enc.set_height(f.height());
    enc.set_format(format::Pixel::YUVJ420P);
    enc.set_time_base(Rational(1, 25));
    enc.set_aspect_ratio(Rational(1, 1));
    // Fixed quantiser ~ `-q:v 3`: good quality, a few tens of KB.
    let quality = 3 * ffmpeg::ffi::FF_QP2LAMBDA;
    enc.set_flags(codec::Flags::QSCALE);
    enc.set_global_quality(quality);
    let mut enc = enc
        .open_as(codec)
        .map_err(|e| MediaError::failed("open mjpeg", e))?;
    let mut f = f.clone();
    f.set_pts(Some(0));
    unsafe {
        (*f.as_mut_ptr()).quality = quality;
    }
    enc.send_frame(&f)
        .map_err(|e| MediaError::failed("encode poster", e))?;
    enc.send_eof()
        .map_err(|e| MediaError::failed("flush mjpeg", e))?;
    let mut out = Vec::new();
    let mut pkt = Packet::empty();
    loop {
        match enc.receive_packet(&mut pkt) {
            Ok(()) => out.extend_from_slice(pkt.data().unwrap_or_default()),
            Err(ffmpeg::Error::Eof) => break,
            Err(e) if is_again(&e) => break,
            Err(e) => return Err(MediaError::failed("encode poster", e)),
        }
    }
    if out.is_empty() {
        return Err(MediaError::failed("encode poster", "no JPEG produced"));
    }
    Ok(out)
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".part");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
