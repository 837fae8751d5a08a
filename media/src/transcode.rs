//! Upload → LibVLC-safe MP4 conversion.
//!
//! Why the output is shaped the way it is: the Second Life viewer plays
//! parcel media through LibVLC, and the files are served over plain HTTP.
//! H.264 yuv420p with even dimensions, AAC-LC stereo 48 kHz and a `moov`
//! atom *before* `mdat` (so playback can start before the download
//! finishes) is the combination that plays everywhere. Frame size is capped
//! (720p by default) because in-world media textures gain nothing from more.
//!
//! Why the pipeline is built the way it is:
//! - Packets are streamed one at a time (demux → decode → filter → encode →
//!   mux), so memory does not grow with input length.
//! - Filter graphs are built lazily from the first *decoded* frame, not from
//!   container metadata, because the two disagree surprisingly often
//!   (pixel format/sample layout unknown until decoding); they are rebuilt if
//!   the decoded format changes mid-stream. The *output* size is fixed up
//!   front since the MP4 header must be written before the first packet.
//! - Source timestamps are kept (only shifted so the file starts at 0) instead
//!   of assuming a constant frame rate, so VFR phone footage stays in sync;
//!   duplicate/backwards video timestamps are dropped because the MP4 muxer
//!   rejects non-monotonic DTS.
//! - Rotation metadata is baked into the pixels (like the ffmpeg CLI's
//!   autorotate) because we do not carry the display matrix to the output
//!   and players differ in honouring it.
//! - Audio goes through `aresample=async=1` so timestamp gaps become silence
//!   instead of drift, and through a buffersink with a fixed frame size since
//!   FFmpeg's AAC encoder only accepts 1024-sample frames.
//! - Streams that already have the target shape (H.264 yuv420p / AAC-LC in
//!   MP4, MOV or MKV) are copied packet for packet instead (remux): two
//!   orders of magnitude faster and no generation loss. Each stream is
//!   decided on its own, so a phone clip with PCM audio keeps its video.
//! - Packets stamped far beyond the container's duration are skipped, so a
//!   damaged or hostile timestamp cannot turn into hours of padding.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::limits::MAX_OUTPUT_DIMENSION;
use super::probe::{
    input_duration_secs, open_input, require_video_stream, stream_fps, stream_rotation,
    MAX_INPUT_PIXELS,
};
use super::MediaError;
use ffmpeg::{
    codec, encoder, filter, format, frame, media, picture, rescale, ChannelLayout, Dictionary,
    Packet, Rational, Rescale,
};
use ffmpeg_next as ffmpeg;

/// Encoding targets. `Default` is what the viewer is known to play well.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Bounding box; the picture is scaled down (never up) to fit, keeping
    /// its display aspect ratio. Capped at
    /// [`MAX_OUTPUT_DIMENSION`](super::MAX_OUTPUT_DIMENSION).
    pub max_width: u32,
    pub max_height: u32,
    /// x264 constant rate factor (lower = better quality, bigger file).
    pub crf: u8,
    /// x264 speed/size trade-off preset.
    pub preset: String,
    /// Keyframe interval in seconds: bounds how far a seek has to decode.
    pub keyframe_secs: u32,
    /// AAC bit rate in bits per second.
    pub audio_bitrate: u32,
    /// Copy (remux) streams that already fit the profile instead of
    /// re-encoding them. Off only to force the encode path (benchmarks).
    pub allow_copy: bool,
    /// A copied H.264 stream may average at most this many bits/s; above it
    /// re-encoding saves viewers' bandwidth.
    pub copy_max_video_bitrate: u64,
    /// A copied H.264 stream may have keyframes at most this far apart
    /// (seconds), so seeking in the viewer stays quick.
    pub copy_max_keyframe_secs: f64,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            max_width: 1280,
            max_height: 720,
            crf: 23,
            preset: "veryfast".to_string(),
            keyframe_secs: 2,
            audio_bitrate: 128_000,
            allow_copy: true,
            copy_max_video_bitrate: 8_000_000,
            copy_max_keyframe_secs: 5.0,
        }
    }
}

/// What was actually written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TranscodeOutput {
    pub width: u32,
    pub height: u32,
    pub duration_secs: f64,
    pub has_audio: bool,
    /// The video stream was copied bit for bit (remux), not re-encoded.
    pub video_copied: bool,
    /// The audio stream was copied bit for bit (remux), not re-encoded.
    pub audio_copied: bool,
}

const OUT_SAMPLE_RATE: i32 = 48_000;
/// How far packet timestamps may reach when the container does not know
/// its duration (the default `Limits::max_duration_secs`).
const UNKNOWN_DURATION_HORIZON_SECS: f64 = 4.0 * 3600.0;
/// Consecutive demux errors after which we treat the input as ended.
const MAX_READ_ERRORS: u32 = 32;

/// Transcode `input` into an MP4 at `output` (overwritten).
///
/// Streams that already fit the profile are copied without re-encoding
/// (see [`TranscodeOutput::video_copied`]); the rest is re-encoded. The
/// output is always a faststart MP4.
///
/// `progress` receives values in `0.0..=1.0`, derived from decoded video
/// timestamps over the container duration; it is called at most ~100 times
/// plus a final `1.0`. Setting `cancel` aborts at the next packet with
/// [`MediaError::Cancelled`]. On any error the partial output file is removed.
///
/// Uploads that were cut off are refused with `truncated` when the container
/// says how long it should be (MP4/MOV, MKV/WebM with a known size, AVI);
/// damaged packets inside an otherwise complete file are skipped, as the
/// ffmpeg CLI does. If nothing at all can be decoded the call fails with
/// `corrupt_media`.
pub fn transcode(
    input: &Path,
    output: &Path,
    profile: &Profile,
    progress: &mut dyn FnMut(f32),
    cancel: &AtomicBool,
) -> Result<TranscodeOutput, MediaError> {
    super::init()?;
    // A panic in our loop (a bug, or an FFmpeg behaviour we did not expect)
    // must not take the whole server down with it.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(input, output, profile, progress, cancel)
    }))
    .unwrap_or_else(|panic| Err(MediaError::failed("panic", panic_message(&panic))));
    match &result {
        Ok(out) => tracing::debug!(?input, ?out, "transcode finished"),
        Err(err) => {
            tracing::warn!(?input, code = err.code(), detail = ?err.detail(), "transcode failed");
            let _ = std::fs::remove_file(output);
        }
    }
    result
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Output paths go through FFmpeg's URL parser: make sure a `:` in a file
/// name is not taken for a protocol, and fail cleanly on non-UTF-8 paths
/// (ffmpeg-next would panic).
pub(crate) fn output_url(path: &Path) -> Result<String, MediaError> {
    let s = path
        .to_str()
        .ok_or_else(|| MediaError::failed("output path", "not valid UTF-8"))?;
    Ok(format!("file:{s}"))
}

fn run(
    input: &Path,
    output: &Path,
    profile: &Profile,
    progress: &mut dyn FnMut(f32),
    cancel: &AtomicBool,
) -> Result<TranscodeOutput, MediaError> {
    if profile.max_width < 2 || profile.max_height < 2 {
        return Err(MediaError::failed(
            "profile",
            "max_width/max_height must be >= 2",
        ));
    }
    let (box_w, box_h) = (
        profile.max_width.min(MAX_OUTPUT_DIMENSION),
        profile.max_height.min(MAX_OUTPUT_DIMENSION),
    );
    let mut ictx = open_input(input)?;

    // ---- stream selection -------------------------------------------------
    let vst = require_video_stream(&ictx)?;
    let v_index = vst.index();
    let v_tb = vst.time_base();
    let ast = ictx.streams().best(media::Type::Audio);
    let a_index = ast.as_ref().map(|s| s.index());
    let a_tb = ast.as_ref().map(|s| s.time_base());

    // Shift everything so the output starts at 0 while keeping A/V offsets.
    let start = unsafe { (*ictx.as_ptr()).start_time };
    let start = if start == ffmpeg::ffi::AV_NOPTS_VALUE {
        0
    } else {
        start
    };
    let v_offset = start.rescale(rescale::TIME_BASE, v_tb);
    let a_offset = a_tb
        .map(|tb| start.rescale(rescale::TIME_BASE, tb))
        .unwrap_or(0);

    let duration = input_duration_secs(&ictx).unwrap_or(0.0);
    let fps = stream_fps(&vst).unwrap_or(30.0);
    let rotation = stream_rotation(&vst);

    // ---- copy or encode? -------------------------------------------------
    let copy_container = profile.allow_copy && is_copy_container(ictx.format().name());
    let copy_video = copy_container
        && match video_copy_check(&vst, box_w, box_h, rotation) {
            Ok(()) => match scan_video(input, v_index, duration, cancel)? {
                Some(scan) => scan
                    .fits(profile)
                    .map_err(|why| tracing::debug!(why, "video not copied"))
                    .is_ok(),
                None => false,
            },
            Err(why) => {
                tracing::debug!(why, "video not copied");
                false
            }
        };
    let copy_audio = copy_container
        && ast.as_ref().is_some_and(|st| {
            audio_copy_check(st)
                .map_err(|why| tracing::debug!(why, "audio not copied"))
                .is_ok()
        });

    // ---- decoders (only for streams we re-encode) -------------------------
    let mut vdec = if copy_video {
        None
    } else {
        Some(
            open_decoder(&vst)?
                .video()
                .map_err(|e| decoder_error(&vst, e))?,
        )
    };
    let mut adec = match &ast {
        Some(st) if !copy_audio => Some(
            open_decoder(st)?
                .audio()
                .map_err(|e| decoder_error(st, e))?,
        ),
        _ => None,
    };

    let (src_w, src_h, src_sar) = match &vdec {
        Some(d) => (d.width(), d.height(), d.aspect_ratio()),
        None => {
            let p = vst.parameters();
            unsafe {
                let p = p.as_ptr();
                (
                    (*p).width.max(0) as u32,
                    (*p).height.max(0) as u32,
                    Rational::from((*p).sample_aspect_ratio),
                )
            }
        }
    };
    if src_w == 0 || src_h == 0 {
        return Err(MediaError::corrupt("video stream", "unknown frame size"));
    }
    let (out_w, out_h) = if copy_video {
        (src_w, src_h)
    } else {
        fit_dimensions(src_w, src_h, src_sar, rotation, box_w, box_h)
    };
    tracing::debug!(
        src_w,
        src_h,
        rotation,
        out_w,
        out_h,
        fps,
        copy_video,
        copy_audio,
        "video geometry"
    );

    // ---- output + encoders ----------------------------------------------
    let mut octx = format::output_as(&output_url(output)?, "mp4")
        .map_err(|e| MediaError::failed("create output", e))?;
    let global_header = octx.format().flags().contains(format::Flags::GLOBAL_HEADER);

    let venc = if copy_video {
        add_copy_stream(&mut octx, &vst)?;
        None
    } else {
        let codec = encoder::find_by_name("libx264")
            .ok_or_else(|| MediaError::failed("encoder", "libx264 is not available"))?;
        let mut ost = octx
            .add_stream(codec)
            .map_err(|e| MediaError::failed("add video stream", e))?;
        let mut enc = codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()
            .map_err(|e| MediaError::failed("video encoder", e))?;
        enc.set_width(out_w);
        enc.set_height(out_h);
        enc.set_format(format::Pixel::YUV420P);
        enc.set_aspect_ratio(Rational(1, 1));
        enc.set_time_base(v_tb);
        enc.set_frame_rate(Some(fps_rational(fps)));
        enc.set_gop(((profile.keyframe_secs as f64 * fps).round() as u32).max(1));
        if global_header {
            enc.set_flags(codec::Flags::GLOBAL_HEADER);
        }
        let mut opts = Dictionary::new();
        opts.set("preset", &profile.preset);
        opts.set("crf", &profile.crf.to_string());
        let opened = enc
            .open_with(opts)
            .map_err(|e| MediaError::failed("open libx264", e))?;
        ost.set_parameters(&opened);
        Some(opened)
    };
    let v_ost = 0usize;

    let aenc = match &ast {
        Some(st) if copy_audio => {
            add_copy_stream(&mut octx, st)?;
            None
        }
        Some(_) => {
            let codec = encoder::find_by_name("aac")
                .ok_or_else(|| MediaError::failed("encoder", "aac encoder is not available"))?;
            let mut ost = octx
                .add_stream(codec)
                .map_err(|e| MediaError::failed("add audio stream", e))?;
            let mut enc = codec::context::Context::new_with_codec(codec)
                .encoder()
                .audio()
                .map_err(|e| MediaError::failed("audio encoder", e))?;
            enc.set_rate(OUT_SAMPLE_RATE);
            // FFmpeg 5.1: the legacy mask is converted to ch_layout on open.
            enc.set_channel_layout(ChannelLayout::STEREO);
            enc.set_format(format::Sample::F32(format::sample::Type::Planar));
            enc.set_bit_rate(profile.audio_bitrate as usize);
            enc.set_time_base(Rational(1, OUT_SAMPLE_RATE));
            if global_header {
                enc.set_flags(codec::Flags::GLOBAL_HEADER);
            }
            let opened = enc
                .open_as(codec)
                .map_err(|e| MediaError::failed("open aac", e))?;
            ost.set_parameters(&opened);
            ost.set_time_base(Rational(1, OUT_SAMPLE_RATE));
            Some(opened)
        }
        None => None,
    };

    let mut header_opts = Dictionary::new();
    header_opts.set("movflags", "+faststart");
    octx.write_header_with(header_opts)
        .map_err(|e| MediaError::failed("write header", e))?;
    // The muxer may change stream time bases in write_header.
    let v_ost_tb = octx.stream(v_ost).map(|s| s.time_base()).unwrap_or(v_tb);
    let a_ost_tb = octx
        .stream(1)
        .map(|s| s.time_base())
        .unwrap_or(Rational(1, OUT_SAMPLE_RATE));

    let mut video = match (vdec.as_mut(), venc) {
        (Some(dec), Some(enc)) => VideoOut::Encode(VideoPipe {
            dec,
            enc,
            graph: None,
            in_tb: v_tb,
            offset: v_offset,
            rotation,
            out_w,
            out_h,
            ost_index: v_ost,
            ost_tb: v_ost_tb,
            next_in_pts: 0,
            last_enc_pts: None,
            frames_encoded: 0,
            decode_errors: 0,
            last_secs: 0.0,
        }),
        _ => VideoOut::Copy(CopyStream::new(&vst, v_offset, v_ost, v_ost_tb)),
    };
    let mut audio = match (adec.as_mut(), aenc) {
        (Some(dec), Some(enc)) => Some(AudioOut::Encode(AudioPipe {
            dec,
            enc,
            graph: None,
            in_tb: a_tb.unwrap_or(Rational(1, OUT_SAMPLE_RATE)),
            offset: a_offset,
            ost_index: 1,
            ost_tb: a_ost_tb,
            next_in_pts: 0,
            next_enc_pts: 0,
            frames_encoded: 0,
            decode_errors: 0,
        })),
        _ => match &ast {
            Some(st) if copy_audio => {
                Some(AudioOut::Copy(CopyStream::new(st, a_offset, 1, a_ost_tb)))
            }
            _ => None,
        },
    };

    // ---- main loop -----------------------------------------------------------
    let mut reported = 0.0f32;
    let mut report = |secs: f64, progress: &mut dyn FnMut(f32)| {
        if duration > 0.0 {
            let p = ((secs / duration) as f32).clamp(0.0, 0.99);
            if p >= reported + 0.01 {
                reported = p;
                progress(p);
            }
        }
    };
    let mut read_errors = 0u32;
    // Packets stamped far beyond the container's duration are damage (or
    // an attack): fed to the encoders they would become hours of padding
    // silence or a frozen frame, so they are skipped.
    let horizon = if duration > 0.0 {
        duration + (duration * 0.5).max(60.0)
    } else {
        UNKNOWN_DURATION_HORIZON_SECS
    };
    let mut skipped = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(MediaError::Cancelled);
        }
        // A fresh packet each time: av_read_frame does not unref its argument.
        let mut pkt = Packet::empty();
        match pkt.read(&mut ictx) {
            Ok(()) => read_errors = 0,
            Err(ffmpeg::Error::Eof) => break,
            Err(e) => {
                read_errors += 1;
                if read_errors >= MAX_READ_ERRORS {
                    tracing::warn!(error = %e, "giving up reading input; treating as truncated");
                    break;
                }
                continue;
            }
        }
        let idx = pkt.stream();
        let (tb, offset) = if idx == v_index {
            (v_tb, v_offset)
        } else {
            (a_tb.unwrap_or(v_tb), a_offset)
        };
        if let Some(ts) = pkt.dts().or(pkt.pts()) {
            if (ts.saturating_sub(offset)) as f64 * f64::from(tb) > horizon {
                skipped += 1;
                if skipped == 1 {
                    tracing::debug!(
                        stream = idx,
                        ts,
                        horizon,
                        "skipping packets beyond duration"
                    );
                }
                continue;
            }
        }
        if idx == v_index {
            let secs = match &mut video {
                VideoOut::Encode(v) => {
                    v.send_packet(Some(&pkt), &mut octx)?;
                    v.last_secs
                }
                VideoOut::Copy(c) => {
                    c.write(pkt, &mut octx)?;
                    c.last_secs
                }
            };
            report(secs, progress);
        } else if Some(idx) == a_index {
            match audio.as_mut() {
                Some(AudioOut::Encode(a)) => a.send_packet(Some(&pkt), &mut octx)?,
                Some(AudioOut::Copy(c)) => c.write(pkt, &mut octx)?,
                None => {}
            }
        }
    }

    // ---- flush: decoders → filters → encoders -----------------------------
    let (video_units, last_secs) = match &mut video {
        VideoOut::Encode(v) => {
            v.send_packet(None, &mut octx)?;
            v.finish(&mut octx)?;
            (v.frames_encoded, v.last_secs)
        }
        VideoOut::Copy(c) => (c.packets, c.last_secs),
    };
    let audio_units = match audio.as_mut() {
        Some(AudioOut::Encode(a)) => {
            a.send_packet(None, &mut octx)?;
            a.finish(&mut octx)?;
            a.frames_encoded
        }
        Some(AudioOut::Copy(c)) => c.packets,
        None => 0,
    };
    if video_units == 0 {
        let errors = match &video {
            VideoOut::Encode(v) => v.decode_errors,
            VideoOut::Copy(_) => 0,
        };
        return Err(MediaError::corrupt(
            "video",
            format!("no frames could be decoded ({errors} decode errors)"),
        ));
    }
    octx.write_trailer()
        .map_err(|e| MediaError::failed("write trailer", e))?;
    drop(octx);
    progress(1.0);

    // Ask the demuxer what we wrote rather than re-deriving it.
    let duration_secs = output_duration(output).unwrap_or(last_secs);
    Ok(TranscodeOutput {
        width: out_w,
        height: out_h,
        duration_secs,
        has_audio: audio_units > 0,
        video_copied: copy_video,
        audio_copied: copy_audio && audio_units > 0,
    })
}

fn output_duration(output: &Path) -> Option<f64> {
    let url = output_url(output).ok()?;
    format::input(&url)
        .ok()
        .and_then(|i| input_duration_secs(&i))
}

// ---------------------------------------------------------------------------
// Remux (stream copy)

/// Containers whose H.264/AAC we copy: their packets are already in the
/// length-prefixed (AVCC) layout MP4 stores, with parameter sets in
/// extradata. MPEG-TS/FLV are re-encoded (Annex B conversion, timestamp
/// quirks), as agreed in the issue.
fn is_copy_container(demuxer: &str) -> bool {
    demuxer.split(',').any(|n| n == "mov" || n == "matroska")
}

/// Can this video stream go into the output unchanged? `Err` names why not
/// (for logs).
fn video_copy_check(
    st: &format::stream::Stream,
    box_w: u32,
    box_h: u32,
    rotation: i32,
) -> Result<(), &'static str> {
    let par = st.parameters();
    let p = unsafe { &*par.as_ptr() };
    if p.codec_id != ffmpeg::ffi::AVCodecID::AV_CODEC_ID_H264 {
        return Err("not H.264");
    }
    if p.format != ffmpeg::ffi::AVPixelFormat::AV_PIX_FMT_YUV420P as i32 {
        return Err("not 8-bit yuv420p (limited range)");
    }
    let (w, h) = (p.width.max(0) as u32, p.height.max(0) as u32);
    if w < 2 || h < 2 || w % 2 != 0 || h % 2 != 0 {
        return Err("odd dimensions");
    }
    if w > box_w || h > box_h {
        return Err("larger than the output box");
    }
    if rotation != 0 {
        return Err("rotation must be applied");
    }
    let sar = p.sample_aspect_ratio;
    if sar.num > 0 && sar.den > 0 && sar.num != sar.den {
        return Err("non-square pixels");
    }
    if p.extradata.is_null() || p.extradata_size <= 0 {
        return Err("no out-of-band parameter sets");
    }
    use ffmpeg::ffi::AVFieldOrder::*;
    if !matches!(p.field_order, AV_FIELD_UNKNOWN | AV_FIELD_PROGRESSIVE) {
        return Err("interlaced");
    }
    Ok(())
}

/// AAC-LC, mono or stereo, 44.1 or 48 kHz: what every player handles.
fn audio_copy_check(st: &format::stream::Stream) -> Result<(), &'static str> {
    let par = st.parameters();
    let p = unsafe { &*par.as_ptr() };
    if p.codec_id != ffmpeg::ffi::AVCodecID::AV_CODEC_ID_AAC {
        return Err("not AAC");
    }
    if p.profile != ffmpeg::ffi::FF_PROFILE_AAC_LOW {
        return Err("not AAC-LC");
    }
    if !(1..=2).contains(&p.ch_layout.nb_channels) {
        return Err("more than two channels");
    }
    if p.sample_rate != 44_100 && p.sample_rate != 48_000 {
        return Err("unusual sample rate");
    }
    if p.extradata.is_null() || p.extradata_size <= 0 {
        return Err("no AudioSpecificConfig");
    }
    Ok(())
}

/// Packet-level statistics of the video stream, gathered without decoding.
#[derive(Debug)]
struct VideoScan {
    first_is_key: bool,
    max_key_gap_secs: f64,
    bytes: u64,
    span_secs: f64,
}

impl VideoScan {
    fn fits(&self, profile: &Profile) -> Result<(), &'static str> {
        if !self.first_is_key {
            return Err("does not start with a keyframe");
        }
        if self.max_key_gap_secs > profile.copy_max_keyframe_secs {
            return Err("keyframes too far apart");
        }
        let rate = self.bytes as f64 * 8.0 / self.span_secs.max(0.5);
        if rate > profile.copy_max_video_bitrate as f64 {
            return Err("bit rate too high");
        }
        Ok(())
    }
}

/// Read every video packet once (other streams discarded, so the demuxer
/// skips their data) to measure keyframe spacing and bit rate. Costs one
/// read of the file, far less than decoding it. `None` when the stream
/// cannot be read cleanly; the encode path then deals with it.
fn scan_video(
    input: &Path,
    v_index: usize,
    duration: f64,
    cancel: &AtomicBool,
) -> Result<Option<VideoScan>, MediaError> {
    let mut ictx = open_input(input)?;
    for mut st in ictx.streams_mut() {
        if st.index() != v_index {
            unsafe { (*st.as_mut_ptr()).discard = ffmpeg::ffi::AVDiscard::AVDISCARD_ALL };
        }
    }
    let tb = match ictx.stream(v_index) {
        Some(st) => f64::from(st.time_base()),
        None => return Ok(None),
    };
    let (mut first, mut last_key, mut first_ts, mut last_ts) = (None, None, None, None);
    let (mut max_gap, mut bytes) = (0.0f64, 0u64);
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(MediaError::Cancelled);
        }
        let mut pkt = Packet::empty();
        match pkt.read(&mut ictx) {
            Ok(()) => {}
            Err(ffmpeg::Error::Eof) => break,
            Err(_) => return Ok(None),
        }
        if pkt.stream() != v_index {
            continue;
        }
        let Some(ts) = pkt.pts().or(pkt.dts()) else {
            return Ok(None);
        };
        let secs = ts as f64 * tb;
        bytes += pkt.size() as u64;
        first.get_or_insert(pkt.is_key());
        first_ts = Some(first_ts.map_or(secs, |f: f64| f.min(secs)));
        last_ts = Some(last_ts.map_or(secs, |l: f64| l.max(secs)));
        if pkt.is_key() {
            if let Some(k) = last_key {
                max_gap = max_gap.max(secs - k);
            }
            last_key = Some(secs);
        }
    }
    let (Some(first_is_key), Some(first_ts), Some(last_ts), Some(last_key)) =
        (first, first_ts, last_ts, last_key)
    else {
        return Ok(None);
    };
    // The stretch after the last keyframe counts as a gap too.
    max_gap = max_gap.max(last_ts - last_key);
    let span = if duration > 0.0 {
        duration
    } else {
        last_ts - first_ts
    };
    Ok(Some(VideoScan {
        first_is_key,
        max_key_gap_secs: max_gap,
        bytes,
        span_secs: span,
    }))
}

/// An output stream that takes the input stream's packets unchanged.
fn add_copy_stream(
    octx: &mut format::context::Output,
    ist: &format::stream::Stream,
) -> Result<(), MediaError> {
    let mut ost = octx
        .add_stream(encoder::find(codec::Id::None))
        .map_err(|e| MediaError::failed("add copy stream", e))?;
    ost.set_parameters(ist.parameters());
    ost.set_time_base(ist.time_base());
    ost.set_avg_frame_rate(ist.avg_frame_rate());
    unsafe {
        // The input's tag (or none, from MKV) is not necessarily valid in
        // MP4; let the muxer choose (`avc1`, `mp4a`).
        (*(*ost.as_mut_ptr()).codecpar).codec_tag = 0;
    }
    Ok(())
}

struct CopyStream {
    in_tb: Rational,
    offset: i64,
    ost_index: usize,
    ost_tb: Rational,
    /// Nominal frame duration in `in_tb` (0 if unknown), for packets that
    /// come without a duration.
    frame_dur: i64,
    /// Frames of reordering delay (B-frames), from the stream parameters.
    reorder_delay: i64,
    /// Last DTS in `in_tb`, after shifting.
    last_in_dts: Option<i64>,
    /// Last DTS written, in `ost_tb`.
    last_dts: Option<i64>,
    packets: u64,
    last_secs: f64,
}

impl CopyStream {
    fn new(st: &format::stream::Stream, offset: i64, ost_index: usize, ost_tb: Rational) -> Self {
        let in_tb = st.time_base();
        let rate = st.avg_frame_rate();
        let frame_dur = if rate.numerator() > 0 && rate.denominator() > 0 {
            1i64.rescale(rate.invert(), in_tb)
        } else {
            0
        };
        let reorder_delay = unsafe { i64::from((*st.parameters().as_ptr()).video_delay.max(0)) };
        CopyStream {
            in_tb,
            offset,
            ost_index,
            ost_tb,
            frame_dur,
            reorder_delay,
            last_in_dts: None,
            last_dts: None,
            packets: 0,
            last_secs: 0.0,
        }
    }

    /// Shift, rescale and mux one packet; the payload is never touched.
    ///
    /// Matroska stores only presentation times, so for H.264 with B-frames
    /// the demuxer leaves the first packets' DTS unset. Like the ffmpeg CLI,
    /// we then predict it: the first one starts `reorder_delay` frames before
    /// its PTS, later ones follow the previous DTS by one frame duration.
    fn write(
        &mut self,
        mut pkt: Packet,
        octx: &mut format::context::Output,
    ) -> Result<(), MediaError> {
        let step = if pkt.duration() > 0 {
            pkt.duration()
        } else {
            self.frame_dur
        };
        let pts = pkt.pts().map(|t| t - self.offset);
        let dts = match (pkt.dts().map(|t| t - self.offset), self.last_in_dts, pts) {
            (Some(dts), _, _) => dts,
            (None, Some(last), _) if step > 0 => last + step,
            (None, None, Some(pts)) => pts - self.reorder_delay * step.max(0),
            (None, _, Some(pts)) => pts,
            // A packet we cannot place in time; the muxer would refuse it.
            (None, _, None) => return Ok(()),
        };
        self.last_in_dts = Some(dts);
        let pts = pts.unwrap_or(dts);
        self.last_secs = pts as f64 * f64::from(self.in_tb);
        pkt.set_pts(Some(pts));
        pkt.set_dts(Some(dts));
        pkt.rescale_ts(self.in_tb, self.ost_tb);
        // The MP4 muxer refuses non-increasing DTS and DTS after PTS; nudge
        // timestamps rather than drop data, so the stream stays bit-identical.
        let mut dts = pkt.dts().unwrap_or(0);
        if let Some(last) = self.last_dts {
            if dts <= last {
                dts = last + 1;
            }
        }
        let pts = pkt.pts().unwrap_or(dts).max(dts);
        pkt.set_dts(Some(dts));
        pkt.set_pts(Some(pts));
        self.last_dts = Some(dts);
        pkt.set_stream(self.ost_index);
        pkt.set_position(-1);
        pkt.write_interleaved(octx)
            .map_err(|e| mux_error("write copied packet", e))?;
        self.packets += 1;
        Ok(())
    }
}

enum VideoOut<'a> {
    Copy(CopyStream),
    Encode(VideoPipe<'a>),
}

enum AudioOut<'a> {
    Copy(CopyStream),
    Encode(AudioPipe<'a>),
}

// ---------------------------------------------------------------------------
// Decoding helpers

pub(crate) fn open_decoder(
    st: &format::stream::Stream,
) -> Result<codec::decoder::Decoder, MediaError> {
    let mut ctx = codec::context::Context::from_parameters(st.parameters())
        .map_err(|e| MediaError::corrupt("stream parameters", e))?;
    ctx.set_threading(codec::threading::Config {
        kind: codec::threading::Type::Frame,
        count: 2,
        ..Default::default()
    });
    unsafe {
        // Refuse to allocate frames beyond the probe-time cap, even if the
        // bitstream changes size mid-way (decompression bomb).
        (*ctx.as_mut_ptr()).max_pixels = MAX_INPUT_PIXELS as i64;
    }
    let mut dec = ctx.decoder();
    dec.set_packet_time_base(st.time_base());
    Ok(dec)
}

pub(crate) fn decoder_error(st: &format::stream::Stream, e: ffmpeg::Error) -> MediaError {
    match e {
        ffmpeg::Error::DecoderNotFound => MediaError::UnsupportedCodec {
            codec: st.parameters().id().name().to_string(),
        },
        e => MediaError::corrupt("open decoder", e),
    }
}

fn fps_rational(fps: f64) -> Rational {
    // Good enough for NTSC rates (29.97 → 30000/1001).
    let r = Rational::from(fps);
    if r.numerator() > 0 && r.denominator() > 0 {
        r
    } else {
        Rational(30, 1)
    }
}

/// Output size: display size (SAR applied, rotation applied) scaled down to
/// fit the box, never up, both dimensions even (yuv420p needs it) and ≥ 2.
/// Rounds *down* to even so a 641x361 source becomes 640x360, not an upscale.
pub(crate) fn fit_dimensions(
    w: u32,
    h: u32,
    sar: Rational,
    rotation: i32,
    max_w: u32,
    max_h: u32,
) -> (u32, u32) {
    let sar = if sar.numerator() > 0 && sar.denominator() > 0 {
        f64::from(sar)
    } else {
        1.0
    };
    let (mut dw, mut dh) = (w as f64 * sar, h as f64);
    if rotation == 90 || rotation == 270 {
        std::mem::swap(&mut dw, &mut dh);
    }
    let scale = (max_w as f64 / dw).min(max_h as f64 / dh).min(1.0);
    let even = |x: f64, max: u32| -> u32 {
        let v = ((x / 2.0 + 1e-6).floor() as u32) * 2;
        v.clamp(2, max & !1)
    };
    (even(dw * scale, max_w), even(dh * scale, max_h))
}

/// The MP4 muxer refuses timestamps it cannot store (`EINVAL`,
/// `PATCHWELCOME`: out-of-range durations or jumps): those come from the
/// input's timestamps, so they are the file's fault; anything else (disk
/// full, I/O) is ours.
fn mux_error(what: &str, e: ffmpeg::Error) -> MediaError {
    const EINVAL: i32 = 22;
    match e {
        ffmpeg::Error::PatchWelcome
        | ffmpeg::Error::InvalidData
        | ffmpeg::Error::Other { errno: EINVAL } => MediaError::corrupt(what, e),
        e => MediaError::failed(what, e),
    }
}

pub(crate) fn is_again(e: &ffmpeg::Error) -> bool {
    matches!(e, ffmpeg::Error::Other { errno } if *errno == 11 /* EAGAIN */)
}

/// Drain every ready packet from `enc` into the muxer.
fn drain_encoder(
    enc: &mut encoder::Encoder,
    enc_tb: Rational,
    ost_index: usize,
    ost_tb: Rational,
    octx: &mut format::context::Output,
) -> Result<(), MediaError> {
    loop {
        let mut pkt = Packet::empty();
        match enc.receive_packet(&mut pkt) {
            Ok(()) => {
                pkt.set_stream(ost_index);
                pkt.rescale_ts(enc_tb, ost_tb);
                pkt.set_position(-1);
                pkt.write_interleaved(octx)
                    .map_err(|e| mux_error("write packet", e))?;
            }
            Err(ffmpeg::Error::Eof) => return Ok(()),
            Err(e) if is_again(&e) => return Ok(()),
            Err(e) => return Err(MediaError::failed("encode", e)),
        }
    }
}

// ---------------------------------------------------------------------------
// Video

struct VideoGraph {
    graph: filter::Graph,
    key: (u32, u32, format::Pixel),
}

struct VideoPipe<'a> {
    dec: &'a mut codec::decoder::Video,
    enc: encoder::Video,
    graph: Option<VideoGraph>,
    in_tb: Rational,
    offset: i64,
    rotation: i32,
    out_w: u32,
    out_h: u32,
    ost_index: usize,
    ost_tb: Rational,
    /// Fallback pts for frames without one.
    next_in_pts: i64,
    last_enc_pts: Option<i64>,
    frames_encoded: u64,
    decode_errors: u64,
    /// Latest decoded position in seconds (for progress).
    last_secs: f64,
}

impl VideoPipe<'_> {
    /// `None` flushes the decoder.
    fn send_packet(
        &mut self,
        pkt: Option<&Packet>,
        octx: &mut format::context::Output,
    ) -> Result<(), MediaError> {
        let sent = match pkt {
            Some(p) => self.dec.send_packet(p),
            None => self.dec.send_eof(),
        };
        if let Err(e) = sent {
            // Damaged packets are skipped, as the ffmpeg CLI does.
            self.decode_errors += 1;
            tracing::debug!(error = %e, "video packet rejected by decoder");
        }
        let mut decoded = frame::Video::empty();
        loop {
            match self.dec.receive_frame(&mut decoded) {
                Ok(()) => self.push_frame(&mut decoded, octx)?,
                Err(ffmpeg::Error::Eof) => break,
                Err(e) if is_again(&e) => break,
                Err(e) => {
                    self.decode_errors += 1;
                    tracing::debug!(error = %e, "video decode error");
                    break;
                }
            }
        }
        Ok(())
    }

    fn push_frame(
        &mut self,
        f: &mut frame::Video,
        octx: &mut format::context::Output,
    ) -> Result<(), MediaError> {
        let pts = match f.timestamp() {
            Some(ts) => ts - self.offset,
            None => self.next_in_pts,
        };
        // Assume ~1 frame step when the next frame lacks a timestamp.
        let step = (f64::from(self.in_tb.invert()) / 30.0).max(1.0) as i64;
        self.next_in_pts = pts + step;
        self.last_secs = pts as f64 * f64::from(self.in_tb);
        f.set_pts(Some(pts));
        f.set_kind(picture::Type::None);

        let key = (f.width(), f.height(), f.format());
        if self.graph.as_ref().map(|g| g.key) != Some(key) {
            if self.graph.is_some() {
                tracing::debug!(?key, "video format changed mid-stream; rebuilding filters");
                self.finish_graph(octx)?;
            }
            let graph =
                build_video_graph(f, self.in_tb, self.rotation, self.out_w, self.out_h, false)
                    .map_err(|e| MediaError::failed("video filter", e))?;
            self.graph = Some(VideoGraph { graph, key });
        }
        let g = self.graph.as_mut().expect("graph just built");
        g.graph
            .get("in")
            .expect("buffer source exists")
            .source()
            .add(f)
            .map_err(|e| MediaError::failed("video filter input", e))?;
        self.pull_filtered(octx)
    }

    fn pull_filtered(&mut self, octx: &mut format::context::Output) -> Result<(), MediaError> {
        let Some(g) = self.graph.as_mut() else {
            return Ok(());
        };
        let mut sink_ctx = g.graph.get("out").expect("buffer sink exists");
        let mut sink = sink_ctx.sink();
        let sink_tb = sink.time_base();
        let enc_tb = self.enc.time_base();
        let mut filtered = frame::Video::empty();
        loop {
            match sink.frame(&mut filtered) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => break,
                Err(e) if is_again(&e) => break,
                Err(e) => return Err(MediaError::failed("video filter output", e)),
            }
            let Some(pts) = filtered.pts() else { continue };
            let pts = pts.rescale(sink_tb, enc_tb);
            // The MP4 muxer rejects non-increasing timestamps; VFR sources and
            // broken files produce duplicates, so drop them (like -vsync vfr).
            if self.last_enc_pts.is_some_and(|last| pts <= last) {
                continue;
            }
            self.last_enc_pts = Some(pts);
            filtered.set_pts(Some(pts));
            filtered.set_kind(picture::Type::None);
            self.enc
                .send_frame(&filtered)
                .map_err(|e| MediaError::failed("send frame to libx264", e))?;
            self.frames_encoded += 1;
            drain_encoder(&mut self.enc, enc_tb, self.ost_index, self.ost_tb, octx)?;
        }
        Ok(())
    }

    /// Flush the current filter graph (EOF) and encode what it held.
    fn finish_graph(&mut self, octx: &mut format::context::Output) -> Result<(), MediaError> {
        if let Some(g) = self.graph.as_mut() {
            g.graph
                .get("in")
                .expect("buffer source exists")
                .source()
                .flush()
                .map_err(|e| MediaError::failed("flush video filter", e))?;
            self.pull_filtered(octx)?;
        }
        self.graph = None;
        Ok(())
    }

    fn finish(&mut self, octx: &mut format::context::Output) -> Result<(), MediaError> {
        self.finish_graph(octx)?;
        let enc_tb = self.enc.time_base();
        self.enc
            .send_eof()
            .map_err(|e| MediaError::failed("flush libx264", e))?;
        drain_encoder(&mut self.enc, enc_tb, self.ost_index, self.ost_tb, octx)
    }
}

/// `buffer → [rotate] → scale → square pixels → yuv420p → buffersink` for
/// frames shaped like `f`. `full_range` makes JPEG-range `yuvj420p` instead
/// (the poster's MJPEG encoder wants it).
pub(super) fn build_video_graph(
    f: &frame::Video,
    tb: Rational,
    rotation: i32,
    out_w: u32,
    out_h: u32,
    full_range: bool,
) -> Result<filter::Graph, ffmpeg::Error> {
    let mut graph = filter::Graph::new();
    let sar = f.aspect_ratio();
    let sar = if sar.numerator() > 0 && sar.denominator() > 0 {
        sar
    } else {
        Rational(1, 1)
    };
    let args = format!(
        "video_size={}x{}:pix_fmt={}:time_base={}/{}:pixel_aspect={}/{}",
        f.width(),
        f.height(),
        ffmpeg::ffi::AVPixelFormat::from(f.format()) as i32,
        tb.numerator(),
        tb.denominator(),
        sar.numerator(),
        sar.denominator(),
    );
    graph.add(
        &filter::find("buffer").ok_or(ffmpeg::Error::FilterNotFound)?,
        "in",
        &args,
    )?;
    graph.add(
        &filter::find("buffersink").ok_or(ffmpeg::Error::FilterNotFound)?,
        "out",
        "",
    )?;
    let rotate = match rotation {
        90 => "transpose=clock,",
        180 => "hflip,vflip,",
        270 => "transpose=cclock,",
        _ => "",
    };
    let spec = if full_range {
        format!(
            "{rotate}scale={out_w}:{out_h}:flags=bicubic:out_range=full,setsar=1,format=yuvj420p"
        )
    } else {
        format!("{rotate}scale={out_w}:{out_h}:flags=bicubic,setsar=1,format=yuv420p")
    };
    graph.output("in", 0)?.input("out", 0)?.parse(&spec)?;
    graph.validate()?;
    Ok(graph)
}

// ---------------------------------------------------------------------------
// Audio

struct AudioGraph {
    graph: filter::Graph,
    key: (format::Sample, u32, u64, u16),
}

struct AudioPipe<'a> {
    dec: &'a mut codec::decoder::Audio,
    enc: encoder::Audio,
    graph: Option<AudioGraph>,
    in_tb: Rational,
    offset: i64,
    ost_index: usize,
    ost_tb: Rational,
    next_in_pts: i64,
    /// Next expected output pts in 1/48000 (keeps pts monotonic across
    /// filter rebuilds).
    next_enc_pts: i64,
    frames_encoded: u64,
    decode_errors: u64,
}

impl AudioPipe<'_> {
    fn send_packet(
        &mut self,
        pkt: Option<&Packet>,
        octx: &mut format::context::Output,
    ) -> Result<(), MediaError> {
        let sent = match pkt {
            Some(p) => self.dec.send_packet(p),
            None => self.dec.send_eof(),
        };
        if let Err(e) = sent {
            self.decode_errors += 1;
            tracing::debug!(error = %e, "audio packet rejected by decoder");
        }
        let mut decoded = frame::Audio::empty();
        loop {
            match self.dec.receive_frame(&mut decoded) {
                Ok(()) => self.push_frame(&mut decoded, octx)?,
                Err(ffmpeg::Error::Eof) => break,
                Err(e) if is_again(&e) => break,
                Err(e) => {
                    self.decode_errors += 1;
                    tracing::debug!(error = %e, "audio decode error");
                    break;
                }
            }
        }
        Ok(())
    }

    fn push_frame(
        &mut self,
        f: &mut frame::Audio,
        octx: &mut format::context::Output,
    ) -> Result<(), MediaError> {
        if f.samples() == 0 || f.rate() == 0 || f.channels() == 0 {
            return Ok(());
        }
        let pts = match f.timestamp() {
            Some(ts) => ts - self.offset,
            None => self.next_in_pts,
        };
        self.next_in_pts =
            pts + (f.samples() as i64).rescale(Rational(1, f.rate() as i32), self.in_tb);
        f.set_pts(Some(pts));

        // FFmpeg 5.1 reports "unknown" layouts as a zero legacy mask.
        let mut layout = f.channel_layout();
        if layout.bits() == 0 || layout.channels() != f.channels() as i32 {
            layout = ChannelLayout::default(f.channels() as i32);
        }
        let key = (f.format(), f.rate(), layout.bits(), f.channels());
        if self.graph.as_ref().map(|g| g.key) != Some(key) {
            if self.graph.is_some() {
                tracing::debug!(?key, "audio format changed mid-stream; rebuilding filters");
                self.finish_graph(octx)?;
            }
            let graph = build_audio_graph(f, layout, self.in_tb, self.enc.frame_size())
                .map_err(|e| MediaError::failed("audio filter", e))?;
            self.graph = Some(AudioGraph { graph, key });
        }
        let g = self.graph.as_mut().expect("graph just built");
        g.graph
            .get("in")
            .expect("abuffer source exists")
            .source()
            .add(f)
            .map_err(|e| MediaError::failed("audio filter input", e))?;
        self.pull_filtered(octx)
    }

    fn pull_filtered(&mut self, octx: &mut format::context::Output) -> Result<(), MediaError> {
        let Some(g) = self.graph.as_mut() else {
            return Ok(());
        };
        let mut sink_ctx = g.graph.get("out").expect("abuffersink exists");
        let mut sink = sink_ctx.sink();
        let sink_tb = sink.time_base();
        let enc_tb = self.enc.time_base();
        let mut filtered = frame::Audio::empty();
        loop {
            match sink.frame(&mut filtered) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => break,
                Err(e) if is_again(&e) => break,
                Err(e) => return Err(MediaError::failed("audio filter output", e)),
            }
            let pts = filtered
                .pts()
                .map(|p| p.rescale(sink_tb, enc_tb))
                .unwrap_or(self.next_enc_pts)
                .max(self.next_enc_pts);
            filtered.set_pts(Some(pts));
            self.next_enc_pts = pts + filtered.samples() as i64;
            self.enc
                .send_frame(&filtered)
                .map_err(|e| MediaError::failed("send frame to aac", e))?;
            self.frames_encoded += 1;
            drain_encoder(&mut self.enc, enc_tb, self.ost_index, self.ost_tb, octx)?;
        }
        Ok(())
    }

    fn finish_graph(&mut self, octx: &mut format::context::Output) -> Result<(), MediaError> {
        if let Some(g) = self.graph.as_mut() {
            g.graph
                .get("in")
                .expect("abuffer source exists")
                .source()
                .flush()
                .map_err(|e| MediaError::failed("flush audio filter", e))?;
            self.pull_filtered(octx)?;
        }
        self.graph = None;
        Ok(())
    }

    fn finish(&mut self, octx: &mut format::context::Output) -> Result<(), MediaError> {
        self.finish_graph(octx)?;
        let enc_tb = self.enc.time_base();
        self.enc
            .send_eof()
            .map_err(|e| MediaError::failed("flush aac", e))?;
        drain_encoder(&mut self.enc, enc_tb, self.ost_index, self.ost_tb, octx)
    }
}

fn build_audio_graph(
    f: &frame::Audio,
    layout: ChannelLayout,
    tb: Rational,
    frame_size: u32,
) -> Result<filter::Graph, ffmpeg::Error> {
    let mut graph = filter::Graph::new();
    let args = format!(
        "time_base={}/{}:sample_rate={}:sample_fmt={}:channel_layout=0x{:x}",
        tb.numerator(),
        tb.denominator(),
        f.rate(),
        f.format().name(),
        layout.bits(),
    );
    graph.add(
        &filter::find("abuffer").ok_or(ffmpeg::Error::FilterNotFound)?,
        "in",
        &args,
    )?;
    graph.add(
        &filter::find("abuffersink").ok_or(ffmpeg::Error::FilterNotFound)?,
        "out",
        "",
    )?;
    let spec = format!(
        "aresample={OUT_SAMPLE_RATE}:async=1,\
         aformat=sample_fmts=fltp:sample_rates={OUT_SAMPLE_RATE}:channel_layouts=stereo"
    );
    graph.output("in", 0)?.input("out", 0)?.parse(&spec)?;
    graph.validate()?;
    // The native AAC encoder only takes fixed 1024-sample frames.
    if frame_size > 0 {
        graph
            .get("out")
            .ok_or(ffmpeg::Error::FilterNotFound)?
            .sink()
            .set_frame_size(frame_size);
    }
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_aspect_and_evenness() {
        let one = Rational(1, 1);
        assert_eq!(fit_dimensions(1920, 1080, one, 0, 1280, 720), (1280, 720));
        assert_eq!(fit_dimensions(640, 360, one, 0, 1280, 720), (640, 360));
        assert_eq!(fit_dimensions(641, 361, one, 0, 1280, 720), (640, 360));
        assert_eq!(fit_dimensions(1080, 1920, one, 0, 1280, 720), (404, 720));
        assert_eq!(fit_dimensions(1920, 1080, one, 90, 1280, 720), (404, 720));
        // Anamorphic DV: 720x480 with 32:27 SAR displays as ~853x480.
        assert_eq!(
            fit_dimensions(720, 480, Rational(32, 27), 0, 1280, 720),
            (852, 480)
        );
        assert_eq!(fit_dimensions(1, 1, one, 0, 1280, 720), (2, 2));
        assert_eq!(fit_dimensions(4000, 10, one, 0, 1280, 720), (1280, 2));
    }
}
