//! End-to-end tests: inputs are generated with the `ffmpeg` CLI and outputs are
//! checked with `ffprobe`, i.e. by tools independent of the code under test.
//!
//! Inputs are tiny (320x240, 1–2 s) and encoded with the fastest settings so
//! the whole file runs in well under a minute on two cores.
//!
//! Sections: the input kinds the issue requires; remux (stream copy); poster;
//! limits and rejections; decompression bombs; truncated uploads; misc.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use media::{poster, probe, transcode, validate, Limits, MediaError, Profile, TranscodeOutput};

fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-y", "-v", "error"])
        .args(args)
        .output()
        .expect("run ffmpeg");
    assert!(
        out.status.success(),
        "ffmpeg {:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Streams of `path` as key→value maps (ffprobe compact output), plus the
/// format section as the last map.
fn ffprobe(path: &Path) -> (Vec<HashMap<String, String>>, HashMap<String, String>) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-of", "compact", "-show_entries"])
        .arg("stream=index,codec_name,codec_type,codec_tag_string,profile,pix_fmt,width,height,sample_aspect_ratio,display_aspect_ratio,sample_rate,channels,channel_layout,nb_frames:format=duration,format_name")
        .arg(path)
        .output()
        .expect("run ffprobe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut streams = Vec::new();
    let mut format = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split('|');
        let kind = parts.next().unwrap_or("");
        let map: HashMap<String, String> = parts
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match kind {
            "stream" => streams.push(map),
            "format" => format = map,
            _ => {}
        }
    }
    (streams, format)
}

fn stream<'a>(
    streams: &'a [HashMap<String, String>],
    kind: &str,
) -> Option<&'a HashMap<String, String>> {
    streams.iter().find(|s| s["codec_type"] == kind)
}

/// MD5 of every packet payload of the first `kind` (`v` or `a`) stream, in
/// file order: equal lists mean the stream was copied bit for bit.
fn packet_hashes(path: &Path, kind: &str) -> Vec<String> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", &format!("{kind}:0")])
        .args(["-show_packets", "-show_data_hash", "MD5"])
        .args([
            "-show_entries",
            "packet=size,flags,data_hash",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("run ffprobe");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Presentation times (seconds) of the first `kind` stream's packets, in
/// file order.
fn packet_times(path: &Path, kind: &str) -> Vec<f64> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", &format!("{kind}:0")])
        .args(["-show_entries", "packet=pts_time", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("run ffprobe");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        // Packets with side data print an extra (empty) line.
        .map(|l| l.trim_end_matches(','))
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().unwrap())
        .collect()
}

/// The copied stream is bit-identical and keeps its timing (up to one
/// constant shift), B-frame reordering included.
fn assert_copied(input: &Path, output: &Path, kind: &str) {
    let (h_in, h_out) = (packet_hashes(input, kind), packet_hashes(output, kind));
    assert!(!h_in.is_empty());
    assert_eq!(h_in, h_out, "{kind} packets differ");
    let (t_in, t_out) = (packet_times(input, kind), packet_times(output, kind));
    assert_eq!(t_in.len(), t_out.len());
    let shift = t_out[0] - t_in[0];
    for (i, (a, b)) in t_in.iter().zip(&t_out).enumerate() {
        assert!(
            (b - a - shift).abs() < 0.002,
            "{kind} packet {i}: pts {a} → {b} (shift {shift})"
        );
    }
}

/// Offsets of top-level MP4 boxes by type.
fn top_level_boxes(path: &Path) -> Vec<(String, u64)> {
    let data = std::fs::read(path).unwrap();
    let mut boxes = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= data.len() {
        let size32 = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as u64;
        let kind = String::from_utf8_lossy(&data[pos + 4..pos + 8]).to_string();
        let size = match size32 {
            0 => (data.len() - pos) as u64,
            1 => u64::from_be_bytes(data[pos + 8..pos + 16].try_into().unwrap()),
            n => n,
        };
        boxes.push((kind, pos as u64));
        if size < 8 {
            break;
        }
        pos += size as usize;
    }
    boxes
}

fn assert_faststart(path: &Path) {
    let boxes = top_level_boxes(path);
    let off = |t: &str| boxes.iter().find(|(k, _)| k == t).map(|(_, o)| *o);
    let (moov, mdat) = (
        off("moov").expect("moov box"),
        off("mdat").expect("mdat box"),
    );
    assert!(
        moov < mdat,
        "moov ({moov}) must precede mdat ({mdat}): {boxes:?}"
    );
}

fn run_with(
    input: &Path,
    output: &Path,
    profile: &Profile,
) -> Result<(TranscodeOutput, Vec<f32>), MediaError> {
    let mut seen = Vec::new();
    let cancel = AtomicBool::new(false);
    let out = transcode(input, output, profile, &mut |p| seen.push(p), &cancel)?;
    Ok((out, seen))
}

fn run(input: &Path, output: &Path) -> Result<(TranscodeOutput, Vec<f32>), MediaError> {
    run_with(input, output, &Profile::default())
}

/// The encode path only, as if the input could not be remuxed.
fn encode_only() -> Profile {
    Profile {
        allow_copy: false,
        ..Profile::default()
    }
}

fn assert_progress(seen: &[f32]) {
    assert!(!seen.is_empty());
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress not monotonic: {seen:?}"
    );
    assert_eq!(*seen.last().unwrap(), 1.0);
    assert!(seen.iter().all(|p| (0.0..=1.0).contains(p)));
}

/// Common checks for every successful transcode: an MP4 with H.264
/// yuv420p at `w`x`h` with square pixels, AAC-LC (48 kHz stereo when we
/// encoded it; copied AAC-LC keeps its 44.1/48 kHz mono/stereo shape), and
/// `moov` before `mdat`.
fn assert_playable(output: &Path, w: u32, h: u32, audio: bool) -> HashMap<String, String> {
    let (streams, format) = ffprobe(output);
    assert!(format["format_name"].contains("mp4"), "{format:?}");
    let v = stream(&streams, "video").expect("video stream");
    assert_eq!(v["codec_name"], "h264");
    assert_eq!(v["codec_tag_string"], "avc1");
    assert_eq!(v["pix_fmt"], "yuv420p");
    assert_eq!(v["width"], w.to_string());
    assert_eq!(v["height"], h.to_string());
    assert!(
        ["1:1", "N/A", "0:1"].contains(&v["sample_aspect_ratio"].as_str()),
        "{v:?}"
    );
    match stream(&streams, "audio") {
        Some(a) => {
            assert!(audio, "unexpected audio stream");
            assert_eq!(a["codec_name"], "aac");
            assert_eq!(a["profile"], "LC");
            assert!(["1", "2"].contains(&a["channels"].as_str()), "{a:?}");
            assert!(
                ["44100", "48000"].contains(&a["sample_rate"].as_str()),
                "{a:?}"
            );
        }
        None => assert!(!audio, "missing audio stream"),
    }
    assert_eq!(streams.len(), if audio { 2 } else { 1 });
    assert_faststart(output);
    format
}

/// Audio that we encoded must be exactly the profile: 48 kHz stereo.
fn assert_encoded_audio(output: &Path) {
    let (streams, _) = ffprobe(output);
    let a = stream(&streams, "audio").expect("audio stream");
    assert_eq!(
        (a["sample_rate"].as_str(), a["channels"].as_str()),
        ("48000", "2")
    );
}

fn assert_duration(out: &TranscodeOutput, output: &Path, secs: f64) {
    assert!((out.duration_secs - secs).abs() <= 0.3, "{out:?}");
    let (_, format) = ffprobe(output);
    let dur: f64 = format["duration"].parse().unwrap();
    assert!((dur - secs).abs() <= 0.3, "ffprobe duration {dur}");
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn p(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `ffmpeg` arguments for a 320x240 test pattern plus a sine tone, `secs`
/// long; the caller appends codec options and the output path.
fn av_source(secs: &'static str) -> Vec<&'static str> {
    vec![
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        secs,
        "-ac",
        "2",
    ]
}

/// Make `name` with `codec_args`, transcode it with the default profile and
/// run the common checks. Returns the paths and result for more checks.
fn convert(
    dir: &tempfile::TempDir,
    name: &str,
    codec_args: &[&str],
) -> (PathBuf, PathBuf, TranscodeOutput) {
    let (input, output) = (p(dir, name), p(dir, "out.mp4"));
    let mut args = av_source("2");
    args.extend_from_slice(codec_args);
    args.push(s(&input));
    ffmpeg(&args);
    let info = probe(&input).unwrap();
    validate(
        &info,
        std::fs::metadata(&input).unwrap().len(),
        &Limits::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e:?} for {info:?}"));
    let (out, seen) = run(&input, &output).unwrap();
    assert_progress(&seen);
    assert_eq!((out.width, out.height, out.has_audio), (320, 240, true));
    assert_playable(&output, 320, 240, true);
    assert_duration(&out, &output, 2.0);
    (input, output, out)
}

// ===========================================================================
// Input kinds the issue requires

#[test]
fn vp9_opus_webm_to_mp4() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.webm"), p(&dir, "out.mp4"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=30",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        "2",
        "-c:v",
        "libvpx-vp9",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-b:v",
        "300k",
        "-c:a",
        "libopus",
        s(&input),
    ]);

    let info = probe(&input).unwrap();
    assert_eq!(info.container, "webm");
    assert_eq!(info.format_name, "matroska,webm");
    assert!((info.duration_secs - 2.0).abs() < 0.1, "{info:?}");
    let v = info.video.as_ref().unwrap();
    assert_eq!(
        (v.codec.as_str(), v.width, v.height, v.rotation),
        ("vp9", 640, 360, 0)
    );
    assert!(v.decodable);
    assert!((v.frame_rate - 30.0).abs() < 0.01, "{v:?}");
    let a = info.audio.as_ref().unwrap();
    assert_eq!((a.codec.as_str(), a.sample_rate), ("opus", 48000));
    assert_eq!(a.channels, 1);

    let (out, seen) = run(&input, &output).unwrap();
    assert_progress(&seen);
    assert_eq!((out.width, out.height, out.has_audio), (640, 360, true));
    assert!(!out.video_copied && !out.audio_copied);
    assert_playable(&output, 640, 360, true);
    assert_encoded_audio(&output);
    assert_duration(&out, &output, 2.0);

    // Our own probe agrees with ffprobe on the output.
    let again = probe(&output).unwrap();
    assert_eq!(again.container, "mp4");
    let v = again.video.unwrap();
    assert_eq!((v.codec.as_str(), v.pix_fmt.as_str()), ("h264", "yuv420p"));
    let a = again.audio.unwrap();
    assert_eq!((a.channels, a.profile.as_str()), (2, "LC"));
}

#[test]
fn vp8_vorbis_webm() {
    let dir = tmp();
    let (_, output, out) = convert(
        &dir,
        "in.webm",
        &[
            "-c:v",
            "libvpx",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
            "-b:v",
            "300k",
            "-c:a",
            "libvorbis",
        ],
    );
    assert!(!out.video_copied && !out.audio_copied);
    assert_encoded_audio(&output);
}

#[test]
fn mkv_h264_ac3_copies_video_and_encodes_audio() {
    let dir = tmp();
    let (input, output, out) = convert(
        &dir,
        "in.mkv",
        &[
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            // B-frames: Matroska has no DTS, the remux must rebuild it.
            "-bf",
            "2",
            "-c:a",
            "ac3",
        ],
    );
    assert!(out.video_copied && !out.audio_copied, "{out:?}");
    assert_copied(&input, &output, "v");
    assert_encoded_audio(&output);
}

#[test]
fn mkv_h264_flac() {
    let dir = tmp();
    let (input, output, out) = convert(
        &dir,
        "in.mkv",
        &[
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            "-bf",
            "3",
            "-c:a",
            "flac",
        ],
    );
    assert!(out.video_copied && !out.audio_copied, "{out:?}");
    assert_copied(&input, &output, "v");
    assert_encoded_audio(&output);
}

#[test]
fn avi_mpeg4_part2_mp3() {
    let dir = tmp();
    let (input, output, out) = convert(
        &dir,
        "in.avi",
        &["-c:v", "mpeg4", "-q:v", "5", "-c:a", "libmp3lame"],
    );
    let info = probe(&input).unwrap();
    assert_eq!(info.container, "avi");
    assert_eq!(info.video.unwrap().codec, "mpeg4");
    assert_eq!(info.audio.unwrap().codec, "mp3");
    assert!(!out.video_copied && !out.audio_copied);
    assert_encoded_audio(&output);
}

#[test]
fn mov_h264_pcm_audio() {
    let dir = tmp();
    let (input, output, out) = convert(
        &dir,
        "in.mov",
        &[
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            "-bf",
            "2",
            "-c:a",
            "pcm_s16le",
        ],
    );
    assert_eq!(probe(&input).unwrap().audio.unwrap().codec, "pcm_s16le");
    // H.264 fits and is copied; PCM must become AAC.
    assert!(out.video_copied && !out.audio_copied, "{out:?}");
    assert_copied(&input, &output, "v");
    assert_encoded_audio(&output);
}

#[test]
fn flv_h264_aac() {
    let dir = tmp();
    let (input, output, out) = convert(
        &dir,
        "in.flv",
        &["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"],
    );
    assert_eq!(probe(&input).unwrap().container, "flv");
    // FLV is outside the remux list: re-encoded.
    assert!(!out.video_copied && !out.audio_copied);
    assert_encoded_audio(&output);
}

#[test]
fn mpegts_mpeg2_mp2() {
    let dir = tmp();
    let (input, output, out) = convert(
        &dir,
        "in.ts",
        &["-c:v", "mpeg2video", "-q:v", "5", "-c:a", "mp2"],
    );
    assert_eq!(probe(&input).unwrap().container, "mpegts");
    assert!(!out.video_copied && !out.audio_copied);
    assert_encoded_audio(&output);
}

#[test]
fn h264_1080p_is_scaled_to_720p() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.mp4"), p(&dir, "out.mp4"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=1920x1080:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=44100",
        "-t",
        "1",
        "-ac",
        "2",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-c:a",
        "aac",
        s(&input),
    ]);
    let info = probe(&input).unwrap();
    assert_eq!(info.container, "mp4");
    assert_eq!(info.video.as_ref().unwrap().width, 1920);
    assert_eq!(info.audio.as_ref().unwrap().sample_rate, 44100);

    let (out, _) = run(&input, &output).unwrap();
    assert_eq!((out.width, out.height), (1280, 720));
    assert!((out.duration_secs - 1.0).abs() <= 0.3, "{out:?}");
    // Too big to copy, so re-encoded; the AAC-LC audio fits and is copied.
    assert!(!out.video_copied && out.audio_copied, "{out:?}");
    assert_playable(&output, 1280, 720, true);
    assert_copied(&input, &output, "a");

    // Forced through the encoder, 44.1 kHz becomes 48 kHz stereo.
    let (out, _) = run_with(&input, &output, &encode_only()).unwrap();
    assert!(!out.video_copied && !out.audio_copied);
    assert_playable(&output, 1280, 720, true);
    assert_encoded_audio(&output);
}

#[test]
fn odd_dimensions_become_even() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.mkv"), p(&dir, "out.mp4"));
    // yuv444p allows odd sizes, and exercises pixel-format conversion.
    ffmpeg(&[
        // testsrc2 rounds sizes to even, so scale afterwards.
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=30",
        "-t",
        "1",
        "-vf",
        "scale=641:361",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv444p",
        s(&input),
    ]);
    let info = probe(&input).unwrap();
    assert_eq!(info.container, "matroska");
    let v = info.video.unwrap();
    assert_eq!((v.width, v.height), (641, 361));
    assert_eq!(
        (v.pix_fmt.as_str(), v.profile.as_str()),
        ("yuv444p", "High 4:4:4 Predictive")
    );

    let (out, _) = run(&input, &output).unwrap();
    assert_eq!((out.width, out.height, out.has_audio), (640, 360, false));
    assert!(!out.video_copied);
    assert_playable(&output, 640, 360, false);
}

#[test]
fn video_without_audio() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.mp4"), p(&dir, "out.mp4"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=24",
        "-t",
        "1",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        s(&input),
    ]);
    assert!(probe(&input).unwrap().audio.is_none());
    for profile in [Profile::default(), encode_only()] {
        let (out, seen) = run_with(&input, &output, &profile).unwrap();
        assert_progress(&seen);
        assert!(!out.has_audio && !out.audio_copied);
        assert_eq!(out.video_copied, profile.allow_copy);
        assert_playable(&output, 320, 240, false);
    }
}

#[test]
fn variable_frame_rate_input() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.mkv"), p(&dir, "out.mp4"));
    // 30 fps for the first second, then every third frame (10 fps).
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=30",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440",
        "-t",
        "3",
        "-vf",
        "select='lt(t\\,1)+not(mod(n\\,3))'",
        "-fps_mode",
        "vfr",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-c:a",
        "libopus",
        s(&input),
    ]);
    // Both paths must keep the source timing: no CFR padding back to 90.
    for profile in [Profile::default(), encode_only()] {
        let (out, _) = run_with(&input, &output, &profile).unwrap();
        assert_eq!(out.video_copied, profile.allow_copy, "{out:?}");
        assert!((out.duration_secs - 3.0).abs() <= 0.3, "{out:?}");
        let (streams, _) = ffprobe(&output);
        let frames: u32 = stream(&streams, "video").unwrap()["nb_frames"]
            .parse()
            .unwrap();
        // 30 + 20 source frames.
        assert!((48..=52).contains(&frames), "{frames} frames");
        assert_playable(&output, 320, 240, true);
    }
}

#[test]
fn rotated_phone_video_is_rotated_into_pixels() {
    let dir = tmp();
    let (base, input, output) = (p(&dir, "base.mp4"), p(&dir, "in.mp4"), p(&dir, "out.mp4"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x180:rate=30",
        "-t",
        "1",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        s(&base),
    ]);
    // FFmpeg 5.1 only turns the legacy `rotate` tag into a display matrix
    // when stream-copying.
    ffmpeg(&[
        "-i",
        s(&base),
        "-c",
        "copy",
        "-metadata:s:v:0",
        "rotate=90",
        s(&input),
    ]);
    // FFmpeg 5.1's muxer stores the legacy tag as a matrix that FFmpeg itself
    // reads back as 90° counter-clockwise, i.e. 270° clockwise.
    let v = probe(&input).unwrap().video.unwrap();
    assert_eq!((v.width, v.height, v.rotation), (320, 180, 270));
    assert_eq!(v.display_size(), (180, 320));
    let (out, _) = run(&input, &output).unwrap();
    assert_eq!((out.width, out.height), (180, 320));
    // H.264 that needs rotating cannot be copied.
    assert!(!out.video_copied);
    assert_playable(&output, 180, 320, false);

    // Same picture as the ffmpeg CLI's autorotate produces.
    let reference = p(&dir, "ref.mp4");
    ffmpeg(&[
        "-i",
        s(&input),
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-qp",
        "0",
        s(&reference),
    ]);
    let avg = psnr(&output, &reference);
    assert!(
        avg > 30.0,
        "rotated output differs from ffmpeg autorotate: PSNR {avg}"
    );

    // The poster is upright too.
    let jpeg = p(&dir, "poster.jpg");
    assert_eq!(poster(&input, &jpeg, 0.5, 640).unwrap(), (180, 320));
    assert_jpeg(&jpeg, 180, 320);
}

fn psnr(a: &Path, b: &Path) -> f64 {
    let psnr = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "info", "-i"])
        .arg(a)
        .arg("-i")
        .arg(b)
        .args(["-lavfi", "[0:v][1:v]psnr", "-f", "null", "-"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&psnr.stderr);
    log.split("average:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(|s| if s == "inf" { "1000" } else { s })
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no PSNR in: {log}"))
}

#[test]
fn anamorphic_video_gets_square_pixels() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.mkv"), p(&dir, "out.mp4"));
    // NTSC DV shape: 720x480 stored, 32:27 pixels, displayed ~853x480.
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=720x480:rate=25",
        "-t",
        "1",
        "-vf",
        "setsar=32/27",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        s(&input),
    ]);
    let v = probe(&input).unwrap().video.unwrap();
    assert_eq!(v.sample_aspect_ratio, (32, 27));
    assert_eq!(v.display_size(), (853, 480));

    let (out, _) = run(&input, &output).unwrap();
    // Non-square pixels cannot be copied; resampled to square ones.
    assert!(!out.video_copied);
    assert_eq!((out.width, out.height), (852, 480));
    assert_playable(&output, 852, 480, false);
    let (streams, _) = ffprobe(&output);
    let dar = &stream(&streams, "video").unwrap()["display_aspect_ratio"];
    // 852:480 = 71:40 ≈ 16:9 (1.775 vs 1.778).
    assert!(["71:40", "N/A"].contains(&dar.as_str()), "{dar}");
}

#[test]
fn audio_only_is_rejected() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.m4a"), p(&dir, "out.mp4"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440",
        "-t",
        "1",
        "-c:a",
        "aac",
        s(&input),
    ]);
    let info = probe(&input).unwrap();
    assert!(info.video.is_none() && info.audio.is_some());
    let len = std::fs::metadata(&input).unwrap().len();
    assert_eq!(
        validate(&info, len, &Limits::default()).unwrap_err().code(),
        "no_video"
    );
    let err = run(&input, &output).unwrap_err();
    assert_eq!(err.code(), "no_video");
    assert!(!output.exists());

    // An MP3 with album art is still audio-only (the picture is not video).
    let (art, mp3) = (p(&dir, "art.png"), p(&dir, "song.mp3"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=red:size=64x64",
        "-frames:v",
        "1",
        s(&art),
    ]);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440",
        "-i",
        s(&art),
        "-t",
        "1",
        "-map",
        "0:a",
        "-map",
        "1:v",
        "-c:a",
        "libmp3lame",
        "-c:v",
        "png",
        "-disposition:v",
        "attached_pic",
        s(&mp3),
    ]);
    let info = probe(&mp3).unwrap();
    assert!(info.video.is_none(), "{info:?}");
    let len = std::fs::metadata(&mp3).unwrap().len();
    assert_eq!(
        validate(&info, len, &Limits::default()).unwrap_err().code(),
        "no_video"
    );
    assert_eq!(run(&mp3, &output).unwrap_err().code(), "no_video");
}

// ===========================================================================
// Remux

#[test]
fn mp4_h264_aac_is_remuxed_bit_identical() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.mp4"), p(&dir, "out.mp4"));
    // moov at the end (ffmpeg's default), so the remux must also fix that.
    let mut args = av_source("2");
    args.extend([
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-g",
        "25",
        "-bf",
        "2",
        "-c:a",
        "aac",
    ]);
    args.push(s(&input));
    ffmpeg(&args);
    let boxes = top_level_boxes(&input);
    assert!(boxes.iter().position(|b| b.0 == "mdat") < boxes.iter().position(|b| b.0 == "moov"));

    let (out, seen) = run(&input, &output).unwrap();
    assert_progress(&seen);
    assert!(out.video_copied && out.audio_copied, "{out:?}");
    assert_eq!((out.width, out.height, out.has_audio), (320, 240, true));
    assert_playable(&output, 320, 240, true);
    assert_duration(&out, &output, 2.0);
    assert_eq!(packet_hashes(&input, "v").len(), 50);
    assert_copied(&input, &output, "v");
    assert_copied(&input, &output, "a");

    // Timestamps survive too: the copy decodes to the very same pictures.
    assert!(psnr(&input, &output) > 99.0);

    // Knobs that force re-encoding.
    let sparse_keys = Profile {
        copy_max_keyframe_secs: 0.5,
        ..Profile::default()
    };
    let (out, _) = run_with(&input, &output, &sparse_keys).unwrap();
    assert!(!out.video_copied && out.audio_copied, "{out:?}");
    let stingy = Profile {
        copy_max_video_bitrate: 1000,
        ..Profile::default()
    };
    let (out, _) = run_with(&input, &output, &stingy).unwrap();
    assert!(!out.video_copied && out.audio_copied, "{out:?}");
    let small_box = Profile {
        max_width: 160,
        max_height: 120,
        ..Profile::default()
    };
    let (out, _) = run_with(&input, &output, &small_box).unwrap();
    assert!(!out.video_copied, "{out:?}");
    assert_playable(&output, 160, 120, true);
    let (out, _) = run_with(&input, &output, &encode_only()).unwrap();
    assert!(!out.video_copied && !out.audio_copied, "{out:?}");
    assert_playable(&output, 320, 240, true);
    assert_encoded_audio(&output);
}

// ===========================================================================
// Poster

fn assert_jpeg(path: &Path, w: u32, h: u32) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(&data[..3], &[0xFF, 0xD8, 0xFF], "JPEG SOI marker");
    assert_eq!(&data[data.len() - 2..], &[0xFF, 0xD9], "JPEG EOI marker");
    let (streams, _) = ffprobe(path);
    let v = stream(&streams, "video").unwrap();
    assert_eq!(v["codec_name"], "mjpeg");
    assert_eq!(v["pix_fmt"], "yuvj420p");
    assert_eq!(
        (v["width"].as_str(), v["height"].as_str()),
        (w.to_string().as_str(), h.to_string().as_str())
    );
}

#[test]
fn poster_is_a_jpeg_of_the_right_size() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.mp4"), p(&dir, "out.mp4"));
    let mut args = av_source("2");
    args.extend(["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"]);
    args.push(s(&input));
    ffmpeg(&args);
    let (out, _) = run(&input, &output).unwrap();

    let jpeg = p(&dir, "poster.jpg");
    let at = media::default_poster_secs(out.duration_secs);
    assert!((at - 0.2).abs() < 0.05, "{at}");
    assert_eq!(poster(&output, &jpeg, at, 160).unwrap(), (160, 120));
    assert_jpeg(&jpeg, 160, 120);
    assert!(!p(&dir, "poster.jpg.part").exists());

    // Never upscaled; past-the-end and "don't care" times still work.
    assert_eq!(poster(&output, &jpeg, 99.0, 4000).unwrap(), (320, 240));
    assert_jpeg(&jpeg, 320, 240);
    assert_eq!(poster(&output, &jpeg, -1.0, 320).unwrap(), (320, 240));

    // The frame really comes from ~1 s in: testsrc2 draws a moving
    // pattern, so compare with ffmpeg's own grab of that time.
    let reference = p(&dir, "ref.png");
    poster(&output, &jpeg, 1.0, 320).unwrap();
    ffmpeg(&[
        "-ss",
        "1",
        "-i",
        s(&output),
        "-frames:v",
        "1",
        s(&reference),
    ]);
    let other = p(&dir, "other.png");
    ffmpeg(&["-ss", "0", "-i", s(&output), "-frames:v", "1", s(&other)]);
    let (near, far) = (psnr(&jpeg, &reference), psnr(&jpeg, &other));
    assert!(near > 25.0 && near > far + 3.0, "near {near} far {far}");

    // Not a video: a clear error, no file.
    let bad = p(&dir, "bad.jpg");
    let text = p(&dir, "notes.mp4");
    std::fs::write(&text, "hello ".repeat(100)).unwrap();
    assert_eq!(
        poster(&text, &bad, 1.0, 320).unwrap_err().code(),
        "not_media"
    );
    assert!(!bad.exists());
}

// ===========================================================================
// Limits and rejections

#[test]
fn limits_reject_with_stable_codes() {
    let dir = tmp();
    let input = p(&dir, "in.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25",
        "-t",
        "1",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        s(&input),
    ]);
    let info = probe(&input).unwrap();
    let len = std::fs::metadata(&input).unwrap().len();
    let code = |l: &Limits| validate(&info, len, l).err().map(|e| e.code());
    assert_eq!(code(&Limits::default()), None);
    let too = |f: fn(&mut Limits)| {
        let mut l = Limits::default();
        f(&mut l);
        l
    };
    assert_eq!(code(&too(|l| l.max_bytes = 100)), Some("too_large"));
    assert_eq!(code(&too(|l| l.max_duration_secs = 0.5)), Some("too_long"));
    assert_eq!(code(&too(|l| l.max_width = 200)), Some("too_wide"));
    assert_eq!(
        code(&too(|l| l.allowed_containers = vec!["mp4".into()])),
        Some("container_not_allowed")
    );
    let err = validate(&info, len, &too(|l| l.max_bytes = 100)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("The uploaded file is too large"),
        "{err}"
    );
    assert!(err.is_user_error());
}

#[test]
fn still_images_are_rejected() {
    let dir = tmp();
    let jpg = p(&dir, "photo.jpg");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240",
        "-frames:v",
        "1",
        s(&jpg),
    ]);
    let out = p(&dir, "out.mp4");
    // A JPEG renamed .mp4, or left as .jpg: found by content, not name.
    let renamed = p(&dir, "photo.mp4");
    std::fs::copy(&jpg, &renamed).unwrap();
    for path in [&renamed, &jpg] {
        let err = probe(path).unwrap_err();
        assert_eq!(err.code(), "still_image", "{path:?}: {err:?}");
        assert_eq!(run(path, &out).unwrap_err().code(), "still_image");
        assert!(!out.exists());
    }
    // A single PNG frame inside a real video container.
    let mkv = p(&dir, "one.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240",
        "-frames:v",
        "1",
        "-c:v",
        "png",
        s(&mkv),
    ]);
    let info = probe(&mkv).unwrap();
    let len = std::fs::metadata(&mkv).unwrap().len();
    assert_eq!(
        validate(&info, len, &Limits::default()).unwrap_err().code(),
        "still_image"
    );
}

#[test]
fn other_formats_are_not_allowed() {
    let dir = tmp();
    // Animated GIF: a real format, just not one we take.
    let gif = p(&dir, "anim.gif");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=64x48:rate=5",
        "-t",
        "1",
        s(&gif),
    ]);
    assert_eq!(probe(&gif).unwrap_err().code(), "container_not_allowed");

    // A playlist that points at a local file: its demuxer must never run
    // (it would read /etc/passwd into the "video").
    let m3u8 = p(&dir, "evil.mp4");
    std::fs::write(
        &m3u8,
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
    )
    .unwrap();
    let err = probe(&m3u8).unwrap_err();
    assert_eq!(err.code(), "container_not_allowed", "{err:?}");
    let concat = p(&dir, "evil.txt");
    std::fs::write(&concat, "ffconcat version 1.0\nfile '/etc/passwd'\n").unwrap();
    let err = probe(&concat).unwrap_err();
    assert!(
        ["container_not_allowed", "not_media"].contains(&err.code()),
        "{err:?}"
    );

    // Raw H.264 elementary stream: no container at all.
    let raw = p(&dir, "clip.h264");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=64x48",
        "-t",
        "0.2",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        s(&raw),
    ]);
    assert_eq!(probe(&raw).unwrap_err().code(), "container_not_allowed");
}

#[test]
fn text_file_named_mp4_is_not_media() {
    let dir = tmp();
    let (input, output) = (p(&dir, "notes.mp4"), p(&dir, "out.mp4"));
    std::fs::write(
        &input,
        "Meeting notes\nThis is definitely not a video.\n".repeat(50),
    )
    .unwrap();
    assert_eq!(probe(&input).unwrap_err().code(), "not_media");
    let err = run(&input, &output).unwrap_err();
    assert_eq!(err.code(), "not_media");
    assert!(!err.to_string().is_empty());
    assert!(!output.exists());

    // With a text extension, FFmpeg's LRC (lyrics) demuxer would "recognise"
    // plain text; it is not on our demuxer allow-list, and it is not media.
    let txt = p(&dir, "notes.txt");
    std::fs::write(&txt, "[package]\nname = \"media\"\n").unwrap();
    assert_eq!(probe(&txt).unwrap_err().code(), "not_media");

    // Random bytes.
    let noise = p(&dir, "noise.mp4");
    let bytes: Vec<u8> = (0..50_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&noise, bytes).unwrap();
    assert_eq!(probe(&noise).unwrap_err().code(), "not_media");
}

#[test]
fn empty_and_missing_files() {
    let dir = tmp();
    let (input, output) = (p(&dir, "empty.mp4"), p(&dir, "out.mp4"));
    std::fs::write(&input, b"").unwrap();
    assert_eq!(probe(&input).unwrap_err().code(), "empty_file");
    assert_eq!(run(&input, &output).unwrap_err().code(), "empty_file");
    assert_eq!(
        probe(&p(&dir, "missing.mp4")).unwrap_err().code(),
        "io_error"
    );
    assert_eq!(probe(dir.path()).unwrap_err().code(), "io_error");
}

// ===========================================================================
// Decompression bombs

/// Peak resident memory (VmHWM) of this process in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Runs inside a child process (see below): probe and transcode the file
/// named by `MEDIA_BOMB_FILE`, then report codes and peak memory.
#[test]
fn bomb_child() {
    let Ok(path) = std::env::var("MEDIA_BOMB_FILE") else {
        return;
    };
    let path = PathBuf::from(path);
    let probe_code = probe(&path).err().map_or("ok", |e| e.code());
    let out = path.with_extension("out.mp4");
    let transcode_code = run(&path, &out).err().map_or("ok", |e| e.code());
    println!(
        "BOMB probe={probe_code} transcode={transcode_code} rss_kib={}",
        peak_rss_kib()
    );
}

/// Probe and transcode `path` in a fresh process (so other tests' memory
/// does not count) and return (probe code, transcode code, peak RSS MiB).
fn bomb_in_child(path: &Path) -> (String, String, u64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "bomb_child", "--nocapture", "--test-threads=1"])
        .env("MEDIA_BOMB_FILE", path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("BOMB "))
        .unwrap_or_else(|| {
            panic!(
                "child did not report: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k))
            .unwrap()
            .to_string()
    };
    let rss: u64 = field("rss_kib=").parse().unwrap();
    (field("probe="), field("transcode="), rss / 1024)
}

/// Replace every occurrence of `from` with `to` (same length).
fn patch(path: &Path, from: &[u8], to: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    let at = data
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern");
    data[at..at + to.len()].copy_from_slice(to);
    std::fs::write(path, data).unwrap();
}

#[test]
fn decompression_bombs_are_rejected_without_allocating() {
    let dir = tmp();
    let mut bombs = Vec::new();

    // YUV4MPEG2 header claiming 30000x30000 (1.35 GB per frame) and one
    // short frame. FFmpeg's own demuxer would refuse it with a confusing
    // errno; we answer too_wide from the header text.
    let y4m = p(&dir, "bomb.y4m");
    let mut data = b"YUV4MPEG2 W30000 H30000 F25:1 C420jpeg\nFRAME\n".to_vec();
    data.extend(std::iter::repeat_n(0x80u8, 4096));
    std::fs::write(&y4m, &data).unwrap();
    bombs.push(y4m.clone());
    // 16000x16000 (384 MB per frame): FFmpeg would accept this one.
    let y4m16 = p(&dir, "bomb16k.mp4");
    let mut data = b"YUV4MPEG2 W16000 H16000 F25:1 C420jpeg\nFRAME\n".to_vec();
    data.extend(std::iter::repeat_n(0x80u8, 4096));
    std::fs::write(&y4m16, &data).unwrap();
    bombs.push(y4m16);

    // A real H.264 MKV whose header claims 30000x30000 pixels.
    let mkv = p(&dir, "bomb.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x256:rate=25",
        "-t",
        "0.2",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        s(&mkv),
    ]);
    // EBML PixelWidth (0xB0) = 320 and PixelHeight (0xBA) = 256, 2-byte values.
    patch(&mkv, &[0xB0, 0x82, 0x01, 0x40], &[0xB0, 0x82, 0x75, 0x30]);
    patch(&mkv, &[0xBA, 0x82, 0x01, 0x00], &[0xBA, 0x82, 0x75, 0x30]);
    bombs.push(mkv);

    // The other way round: the container says 320x64, the H.264 bitstream
    // says 8448x64 (wider than any input may be).
    let liar = p(&dir, "liar.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=size=8448x64:rate=25",
        "-t",
        "0.12",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        s(&liar),
    ]);
    patch(&liar, &[0xB0, 0x82, 0x21, 0x00], &[0xB0, 0x82, 0x01, 0x40]);
    bombs.push(liar);

    for bomb in &bombs {
        let (probe_code, transcode_code, rss_mib) = bomb_in_child(bomb);
        assert_eq!(probe_code, "too_wide", "{bomb:?}");
        assert_eq!(transcode_code, "too_wide", "{bomb:?}");
        // A single 16000x16000 frame alone would be 366 MiB.
        assert!(rss_mib < 200, "{bomb:?}: peak RSS {rss_mib} MiB");
    }

    // The sentence names the claimed size.
    let err = probe(&y4m).unwrap_err();
    assert!(err.to_string().contains("30000x30000"), "{err}");
}

// ===========================================================================
// Truncated and damaged uploads

fn truncate_copy(src: &Path, dst: &Path, fraction: f64) {
    let data = std::fs::read(src).unwrap();
    std::fs::write(dst, &data[..(data.len() as f64 * fraction) as usize]).unwrap();
}

#[test]
fn uploads_cut_off_midway_are_truncated() {
    let dir = tmp();
    let cases: [(&str, &[&str]); 5] = [
        // ffmpeg's default MP4 layout: moov at the end, lost with the tail.
        (
            "full.mp4",
            &["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"],
        ),
        // moov first: the index survives, mdat is short.
        (
            "fast.mp4",
            &[
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-c:a",
                "aac",
                "-movflags",
                "+faststart",
            ],
        ),
        (
            "full.mkv",
            &["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"],
        ),
        (
            "full.webm",
            &[
                "-c:v",
                "libvpx",
                "-deadline",
                "realtime",
                "-cpu-used",
                "8",
                "-c:a",
                "libopus",
            ],
        ),
        ("full.avi", &["-c:v", "mpeg4", "-c:a", "libmp3lame"]),
    ];
    for (name, codec) in cases {
        let full = p(&dir, name);
        let mut args = av_source("2");
        args.extend_from_slice(codec);
        args.push(s(&full));
        ffmpeg(&args);
        assert!(probe(&full).is_ok(), "{name}");

        let cut = p(&dir, &format!("cut-{name}"));
        truncate_copy(&full, &cut, 0.6);
        let err = probe(&cut).unwrap_err();
        assert_eq!(err.code(), "truncated", "{name}: {err:?}");
        assert!(err.to_string().contains("cut off"));
        let out = p(&dir, "out.mp4");
        assert_eq!(run(&cut, &out).unwrap_err().code(), "truncated", "{name}");
        assert!(!out.exists());
    }
    // Cut right at the start, inside the first box/element.
    let stub = p(&dir, "stub.mp4");
    truncate_copy(&p(&dir, "fast.mp4"), &stub, 0.001);
    let code = probe(&stub).unwrap_err().code();
    assert!(["truncated", "corrupt_media"].contains(&code), "{code}");
}

#[test]
fn damaged_packets_are_skipped() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.mp4"), p(&dir, "out.mp4"));
    let mut args = av_source("2");
    args.extend([
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-g",
        "10",
        "-c:a",
        "aac",
        "-movflags",
        "+faststart",
    ]);
    args.push(s(&input));
    ffmpeg(&args);
    // Overwrite a stretch in the middle of mdat with garbage: the structure
    // is intact (not truncated), some packets are nonsense.
    let mut data = std::fs::read(&input).unwrap();
    let mid = data.len() / 2;
    for (i, b) in data[mid..mid + 3000].iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    std::fs::write(&input, data).unwrap();
    assert!(probe(&input).is_ok());
    let (out, _) = run_with(&input, &output, &encode_only()).unwrap();
    assert!(out.duration_secs > 1.5, "{out:?}");
    assert_playable(&output, 320, 240, true);
}

// ===========================================================================
// Misc

#[test]
fn cancel_stops_and_removes_output() {
    let dir = tmp();
    let (input, output) = (p(&dir, "in.mp4"), p(&dir, "out.mp4"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=30",
        "-t",
        "2",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        s(&input),
    ]);
    for profile in [Profile::default(), encode_only()] {
        let cancel = AtomicBool::new(false);
        let mut calls = 0;
        let err = transcode(
            &input,
            &output,
            &profile,
            &mut |_| {
                calls += 1;
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            },
            &cancel,
        )
        .unwrap_err();
        assert_eq!(err.code(), "cancelled");
        assert_eq!(calls, 1);
        assert!(!output.exists());
    }
}

#[test]
fn odd_paths_work() {
    // `:` would make FFmpeg look for a protocol; spaces and non-ASCII must
    // pass through untouched.
    let dir = tmp();
    let input = p(&dir, "clip: ünïcode 1.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25",
        "-t",
        "1",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-f",
        "mp4",
        &format!("file:{}", s(&input)),
    ]);
    let output = p(&dir, "out: put.mp4");
    assert!(probe(&input).is_ok());
    run(&input, &output).unwrap();
    assert_playable(&output, 320, 240, false);
    let jpeg = p(&dir, "post: er.jpg");
    poster(&output, &jpeg, 0.5, 320).unwrap();
    assert_jpeg(&jpeg, 320, 240);
}

#[test]
fn error_codes_are_stable() {
    assert_eq!(MediaError::EmptyFile.code(), "empty_file");
    assert_eq!(MediaError::NoVideo.code(), "no_video");
    assert_eq!(MediaError::Cancelled.code(), "cancelled");
    assert_eq!(MediaError::NoStreams.code(), "no_streams");
    assert_eq!(
        MediaError::Truncated {
            detail: String::new()
        }
        .code(),
        "truncated"
    );
    assert!(MediaError::EmptyFile.to_string().ends_with('.'));
    // docs/media.md lists every code with its sentence.
    let doc = std::fs::read_to_string(crate_dir().join("../docs/media.md")).expect("docs/media.md");
    for code in MediaError::ALL_CODES {
        assert!(
            doc.contains(&format!("`{code}`")),
            "docs/media.md lacks `{code}`"
        );
    }
    media::init().unwrap();
    media::init().unwrap();
}

/// This crate's folder, as `cargo test` gives it when the test runs. The
/// compile-time value is only a fallback: a build folder shared by two
/// checkouts may hand one of them a binary compiled in the other.
fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

// ===========================================================================
// Checking a result made elsewhere (a transcode worker's)

#[test]
fn a_transcode_result_passes_the_check_and_other_files_do_not() {
    let dir = tmp();
    let (input, _, out) = convert(&dir, "in.mkv", &["-c:v", "libx264", "-c:a", "aac"]);
    let source = probe(&input).unwrap();
    let expected = media::Expected {
        duration_secs: source.duration_secs,
        max_width: 1280,
        max_height: 720,
        audio: true,
    };
    let result = p(&dir, "out.mp4");
    let info = media::check_output(&result, &expected).unwrap();
    assert_eq!(
        info.video.as_ref().map(|v| (v.width, v.height)),
        Some((out.width, out.height))
    );

    // The source itself: H.264/AAC but Matroska.
    let e = media::check_output(&input, &expected).unwrap_err();
    assert!(e.contains("MP4"), "{e}");

    // The right kind of file, of another (shorter) movie.
    let short = p(&dir, "short.mkv");
    let mut args = av_source("1");
    args.extend_from_slice(&["-c:v", "libx264", "-c:a", "aac", s(&short)]);
    ffmpeg(&args);
    let short_mp4 = p(&dir, "short.mp4");
    run(&short, &short_mp4).unwrap();
    let long = media::Expected {
        duration_secs: 10.0,
        ..expected
    };
    let e = media::check_output(&short_mp4, &long).unwrap_err();
    assert!(e.contains("lasts"), "{e}");

    // Larger than the site's bound.
    let small = media::Expected {
        max_width: 160,
        max_height: 120,
        ..expected
    };
    let e = media::check_output(&result, &small).unwrap_err();
    assert!(e.contains("outside"), "{e}");

    // Cut short: the last half of the file gone.
    let bytes = std::fs::read(&result).unwrap();
    let cut = p(&dir, "cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(media::check_output(&cut, &expected).is_err());
}
