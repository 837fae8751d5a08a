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

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::probe::{input_duration_secs, open_input, stream_fps, stream_rotation};
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
    /// its display aspect ratio.
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
        }
    }
}

/// What was actually written.
#[derive(Debug, Clone, PartialEq)]
pub struct TranscodeOutput {
    pub width: u32,
    pub height: u32,
    pub duration_secs: f64,
    pub has_audio: bool,
}

const OUT_SAMPLE_RATE: i32 = 48_000;
/// Consecutive demux errors after which we treat the input as ended.
const MAX_READ_ERRORS: u32 = 32;

/// Transcode `input` into an MP4 at `output` (overwritten).
///
/// `progress` receives values in `0.0..=1.0`, derived from decoded video
/// timestamps over the container duration; it is called at most ~100 times
/// plus a final `1.0`. Setting `cancel` aborts at the next packet with
/// [`MediaError::Cancelled`]. On any error the partial output file is removed.
///
/// Truncated inputs: if the container index is readable (e.g. `moov` at the
/// front) whatever can be decoded is transcoded and the call succeeds with a
/// shorter output; if nothing can be opened or decoded it fails with
/// `corrupt_media`.
pub fn transcode(
    input: &Path,
    output: &Path,
    profile: &Profile,
    progress: &mut dyn FnMut(f32),
    cancel: &AtomicBool,
) -> Result<TranscodeOutput, MediaError> {
    super::init()?;
    let result = run(input, output, profile, progress, cancel);
    match &result {
        Ok(out) => tracing::debug!(?input, ?out, "transcode finished"),
        Err(err) => {
            tracing::warn!(?input, code = err.code(), detail = ?err.detail(), "transcode failed");
            let _ = std::fs::remove_file(output);
        }
    }
    result
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
    let mut ictx = open_input(input)?;

    // ---- stream selection -------------------------------------------------
    let vst = pick_video_stream(&ictx).ok_or_else(|| {
        if ictx.streams().best(media::Type::Audio).is_some() {
            MediaError::NoVideo
        } else {
            MediaError::NoStreams
        }
    })?;
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

    // ---- decoders -----------------------------------------------------------
    let mut vdec = open_decoder(&vst)?
        .video()
        .map_err(|e| decoder_error(&vst, e))?;
    let mut adec = match &ast {
        Some(st) => Some(
            open_decoder(st)?
                .audio()
                .map_err(|e| decoder_error(st, e))?,
        ),
        None => None,
    };

    if vdec.width() == 0 || vdec.height() == 0 {
        return Err(MediaError::corrupt("video stream", "unknown frame size"));
    }
    let (out_w, out_h) = fit_dimensions(
        vdec.width(),
        vdec.height(),
        vdec.aspect_ratio(),
        rotation,
        profile.max_width,
        profile.max_height,
    );
    tracing::debug!(
        src_w = vdec.width(),
        src_h = vdec.height(),
        rotation,
        out_w,
        out_h,
        fps,
        "video geometry"
    );

    // ---- output + encoders ----------------------------------------------
    let mut octx =
        format::output_as(output, "mp4").map_err(|e| MediaError::failed("create output", e))?;
    let global_header = octx.format().flags().contains(format::Flags::GLOBAL_HEADER);

    let venc = {
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
        opened
    };
    let v_ost = 0usize;

    let aenc = if adec.is_some() {
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
    } else {
        None
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

    let mut video = VideoPipe {
        dec: &mut vdec,
        enc: venc,
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
    };
    let mut audio = match (adec.as_mut(), aenc) {
        (Some(dec), Some(enc)) => Some(AudioPipe {
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
        }),
        _ => None,
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
        if idx == v_index {
            video.send_packet(Some(&pkt), &mut octx)?;
            report(video.last_secs, progress);
        } else if Some(idx) == a_index {
            if let Some(a) = audio.as_mut() {
                a.send_packet(Some(&pkt), &mut octx)?;
            }
        }
    }

    // ---- flush: decoders → filters → encoders -----------------------------
    video.send_packet(None, &mut octx)?;
    video.finish(&mut octx)?;
    if let Some(a) = audio.as_mut() {
        a.send_packet(None, &mut octx)?;
        a.finish(&mut octx)?;
    }
    if video.frames_encoded == 0 {
        return Err(MediaError::corrupt(
            "video",
            format!(
                "no frames could be decoded ({} decode errors)",
                video.decode_errors
            ),
        ));
    }
    octx.write_trailer()
        .map_err(|e| MediaError::failed("write trailer", e))?;
    drop(octx);
    progress(1.0);

    let has_audio = audio.as_ref().is_some_and(|a| a.frames_encoded > 0);
    // Ask the demuxer what we wrote rather than re-deriving it.
    let duration_secs = format::input(output)
        .ok()
        .and_then(|i| input_duration_secs(&i))
        .unwrap_or(video.last_secs);
    Ok(TranscodeOutput {
        width: out_w,
        height: out_h,
        duration_secs,
        has_audio,
    })
}

/// The "best" video stream, skipping cover art (attached pictures).
fn pick_video_stream(ictx: &format::context::Input) -> Option<format::stream::Stream<'_>> {
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

fn open_decoder(st: &format::stream::Stream) -> Result<codec::decoder::Decoder, MediaError> {
    let mut ctx = codec::context::Context::from_parameters(st.parameters())
        .map_err(|e| MediaError::corrupt("stream parameters", e))?;
    ctx.set_threading(codec::threading::Config {
        kind: codec::threading::Type::Frame,
        count: 2,
        ..Default::default()
    });
    let mut dec = ctx.decoder();
    dec.set_packet_time_base(st.time_base());
    Ok(dec)
}

fn decoder_error(st: &format::stream::Stream, e: ffmpeg::Error) -> MediaError {
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

fn is_again(e: &ffmpeg::Error) -> bool {
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
                    .map_err(|e| MediaError::failed("write packet", e))?;
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
            let graph = build_video_graph(f, self.in_tb, self.rotation, self.out_w, self.out_h)
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

fn build_video_graph(
    f: &frame::Video,
    tb: Rational,
    rotation: i32,
    out_w: u32,
    out_h: u32,
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
    let spec = format!("{rotate}scale={out_w}:{out_h}:flags=bicubic,setsar=1,format=yuv420p");
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
