//! End-to-end tests: inputs are generated with the `ffmpeg` CLI and outputs are
//! checked with `ffprobe`, i.e. by tools independent of the code under test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use manager::media::{probe, transcode, MediaError, Profile, TranscodeOutput};

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
        .arg("stream=index,codec_name,codec_type,profile,pix_fmt,width,height,sample_rate,channels,channel_layout,nb_frames:format=duration,format_name")
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

fn run(input: &Path, output: &Path) -> Result<(TranscodeOutput, Vec<f32>), MediaError> {
    let mut seen = Vec::new();
    let cancel = AtomicBool::new(false);
    let out = transcode(
        input,
        output,
        &Profile::default(),
        &mut |p| seen.push(p),
        &cancel,
    )?;
    Ok((out, seen))
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

/// Common checks for every successful transcode.
fn assert_playable(output: &Path, w: u32, h: u32, audio: bool) -> HashMap<String, String> {
    let (streams, format) = ffprobe(output);
    assert!(format["format_name"].contains("mp4"), "{format:?}");
    let v = stream(&streams, "video").expect("video stream");
    assert_eq!(v["codec_name"], "h264");
    assert_eq!(v["pix_fmt"], "yuv420p");
    assert_eq!(v["width"], w.to_string());
    assert_eq!(v["height"], h.to_string());
    match stream(&streams, "audio") {
        Some(a) => {
            assert!(audio, "unexpected audio stream");
            assert_eq!(a["codec_name"], "aac");
            assert_eq!(a["profile"], "LC");
            assert_eq!(a["channels"], "2");
            assert_eq!(a["sample_rate"], "48000");
        }
        None => assert!(!audio, "missing audio stream"),
    }
    assert_eq!(streams.len(), if audio { 2 } else { 1 });
    assert_faststart(output);
    format
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn p(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

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
        "5",
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
        input.to_str().unwrap(),
    ]);

    let info = probe(&input).unwrap();
    assert_eq!(info.container, "webm");
    assert!((info.duration_secs - 5.0).abs() < 0.1, "{info:?}");
    let v = info.video.as_ref().unwrap();
    assert_eq!(
        (v.codec.as_str(), v.width, v.height, v.rotation),
        ("vp9", 640, 360, 0)
    );
    assert!((v.frame_rate - 30.0).abs() < 0.01, "{v:?}");
    let a = info.audio.as_ref().unwrap();
    assert_eq!((a.codec.as_str(), a.sample_rate), ("opus", 48000));
    assert_eq!(a.channels, 1);

    let (out, seen) = run(&input, &output).unwrap();
    assert_progress(&seen);
    assert_eq!((out.width, out.height, out.has_audio), (640, 360, true));
    assert!((out.duration_secs - 5.0).abs() <= 0.3, "{out:?}");
    let format = assert_playable(&output, 640, 360, true);
    let dur: f64 = format["duration"].parse().unwrap();
    assert!((dur - 5.0).abs() <= 0.3, "ffprobe duration {dur}");

    // Our own probe agrees with ffprobe on the output.
    let again = probe(&output).unwrap();
    assert_eq!(again.container, "mp4");
    assert_eq!(again.video.unwrap().codec, "h264");
    assert_eq!(again.audio.unwrap().channels, 2);
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
        "2",
        "-ac",
        "2",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-c:a",
        "aac",
        input.to_str().unwrap(),
    ]);
    let info = probe(&input).unwrap();
    assert_eq!(info.container, "mp4");
    assert_eq!(info.video.as_ref().unwrap().width, 1920);
    assert_eq!(info.audio.as_ref().unwrap().sample_rate, 44100);

    let (out, _) = run(&input, &output).unwrap();
    assert_eq!((out.width, out.height), (1280, 720));
    assert!((out.duration_secs - 2.0).abs() <= 0.3, "{out:?}");
    // 44.1 kHz stereo in → 48 kHz stereo out.
    assert_playable(&output, 1280, 720, true);
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
        "2",
        "-vf",
        "scale=641:361",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv444p",
        input.to_str().unwrap(),
    ]);
    let info = probe(&input).unwrap();
    assert_eq!(info.container, "matroska");
    let v = info.video.unwrap();
    assert_eq!((v.width, v.height), (641, 361));

    let (out, _) = run(&input, &output).unwrap();
    assert_eq!((out.width, out.height, out.has_audio), (640, 360, false));
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
        "2",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        input.to_str().unwrap(),
    ]);
    assert!(probe(&input).unwrap().audio.is_none());
    let (out, seen) = run(&input, &output).unwrap();
    assert_progress(&seen);
    assert!(!out.has_audio);
    assert_playable(&output, 320, 240, false);
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
        input.to_str().unwrap(),
    ]);
    let (out, _) = run(&input, &output).unwrap();
    assert!((out.duration_secs - 3.0).abs() <= 0.3, "{out:?}");
    let (streams, _) = ffprobe(&output);
    let frames: u32 = stream(&streams, "video").unwrap()["nb_frames"]
        .parse()
        .unwrap();
    // 30 + 20 source frames; no CFR padding back to 90.
    assert!((48..=52).contains(&frames), "{frames} frames");
    assert_playable(&output, 320, 240, true);
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
        base.to_str().unwrap(),
    ]);
    // FFmpeg 5.1 only turns the legacy `rotate` tag into a display matrix
    // when stream-copying.
    ffmpeg(&[
        "-i",
        base.to_str().unwrap(),
        "-c",
        "copy",
        "-metadata:s:v:0",
        "rotate=90",
        input.to_str().unwrap(),
    ]);
    // FFmpeg 5.1's muxer stores the legacy tag as a matrix that FFmpeg itself
    // reads back as 90° counter-clockwise, i.e. 270° clockwise.
    let v = probe(&input).unwrap().video.unwrap();
    assert_eq!((v.width, v.height, v.rotation), (320, 180, 270));
    let (out, _) = run(&input, &output).unwrap();
    assert_eq!((out.width, out.height), (180, 320));
    assert_playable(&output, 180, 320, false);

    // Same picture as the ffmpeg CLI's autorotate produces.
    let reference = p(&dir, "ref.mp4");
    ffmpeg(&[
        "-i",
        input.to_str().unwrap(),
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-qp",
        "0",
        reference.to_str().unwrap(),
    ]);
    let psnr = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "info", "-i"])
        .arg(&output)
        .arg("-i")
        .arg(&reference)
        .args(["-lavfi", "[0:v][1:v]psnr", "-f", "null", "-"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&psnr.stderr);
    let avg: f64 = log
        .split("average:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no PSNR in: {log}"));
    assert!(
        avg > 30.0,
        "rotated output differs from ffmpeg autorotate: PSNR {avg}"
    );
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
        input.to_str().unwrap(),
    ]);
    let info = probe(&input).unwrap();
    assert!(info.video.is_none() && info.audio.is_some());
    let err = run(&input, &output).unwrap_err();
    assert_eq!(err.code(), "no_video");
    assert!(!output.exists());
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

    // With a text extension, FFmpeg's LRC (lyrics) demuxer "recognises" plain
    // text with a tiny probe score and yields a subtitle stream; still not media.
    let txt = p(&dir, "notes.txt");
    std::fs::write(&txt, "[package]\nname = \"media\"\n").unwrap();
    assert_eq!(probe(&txt).unwrap_err().code(), "not_media");
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
}

fn truncate_copy(src: &Path, dst: &Path, fraction: f64) {
    let data = std::fs::read(src).unwrap();
    std::fs::write(dst, &data[..(data.len() as f64 * fraction) as usize]).unwrap();
}

#[test]
fn truncated_files_do_not_panic() {
    let dir = tmp();
    let full = p(&dir, "full.mp4");
    let full_fast = p(&dir, "full_fast.mp4");
    for (path, extra) in [(&full, None), (&full_fast, Some("+faststart"))] {
        let mut args = vec![
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
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-c:a",
            "aac",
        ];
        if let Some(flags) = extra {
            args.extend(["-movflags", flags]);
        }
        args.push(path.to_str().unwrap());
        ffmpeg(&args);
    }

    // ffmpeg's default layout puts `moov` at the end: the first 30% has no
    // index at all, so nothing is decodable → corrupt_media.
    let cut = p(&dir, "cut.mp4");
    truncate_copy(&full, &cut, 0.3);
    assert_eq!(probe(&cut).unwrap_err().code(), "corrupt_media");
    let out = p(&dir, "out1.mp4");
    let err = run(&cut, &out).unwrap_err();
    assert_eq!(err.code(), "corrupt_media");
    assert!(!out.exists());

    // With `moov` first, the index survives: we transcode what is there and
    // succeed with a shorter output.
    let cut_fast = p(&dir, "cut_fast.mp4");
    truncate_copy(&full_fast, &cut_fast, 0.3);
    let out = p(&dir, "out2.mp4");
    let (res, _) = run(&cut_fast, &out).unwrap();
    assert!(
        res.duration_secs > 0.1 && res.duration_secs < 2.5,
        "{res:?}"
    );
    assert_playable(&out, 320, 240, true);
}

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
        input.to_str().unwrap(),
    ]);
    let cancel = AtomicBool::new(false);
    let mut calls = 0;
    let err = transcode(
        &input,
        &output,
        &Profile::default(),
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

#[test]
fn error_codes_are_stable() {
    assert_eq!(MediaError::EmptyFile.code(), "empty_file");
    assert_eq!(MediaError::NoVideo.code(), "no_video");
    assert_eq!(MediaError::Cancelled.code(), "cancelled");
    assert_eq!(MediaError::NoStreams.code(), "no_streams");
    assert!(MediaError::EmptyFile.to_string().ends_with('.'));
    manager::media::init().unwrap();
    manager::media::init().unwrap();
}
