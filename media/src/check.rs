//! Checks a transcode result made somewhere else (a transcode worker on
//! another machine) before the manager seals it: it must be what
//! [`transcode`](super::transcode) makes, of the movie it was asked for.
//! A worker is trusted with the work, not with the outcome: a bug, a
//! half-written file or a worker on a different FFmpeg must not publish a
//! movie the in-world players cannot play.

use std::{io::Read, path::Path};

use super::ProbeInfo;

/// What the result must match.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    /// The source's duration as probed (0 when its container did not say).
    pub duration_secs: f64,
    pub max_width: u32,
    pub max_height: u32,
    /// Whether the source has an audio stream the result must carry.
    pub audio: bool,
}

/// The result's description when it is a progressive MP4 with H.264
/// yuv420p video, AAC audio if the source had sound, within the size
/// bounds, of the source's duration; otherwise one sentence saying what
/// is wrong.
pub fn check_output(path: &Path, expected: &Expected) -> Result<ProbeInfo, String> {
    let boxes = top_level_boxes(path).map_err(|e| format!("not a whole MP4 file: {e}"))?;
    if boxes.first().map(String::as_str) != Some("ftyp") {
        return Err("not an MP4 file (no ftyp box first)".into());
    }
    let moov = boxes.iter().position(|b| b == "moov");
    let mdat = boxes.iter().position(|b| b == "mdat");
    match (moov, mdat) {
        (Some(m), Some(d)) if m < d => {}
        (Some(_), Some(_)) => return Err("not progressive: moov comes after mdat".into()),
        _ => return Err("incomplete MP4: moov or mdat missing".into()),
    }
    let info = super::probe(path).map_err(|e| format!("cannot be read back: {e}"))?;
    let Some(video) = &info.video else {
        return Err("no video stream".into());
    };
    if video.codec != "h264" || video.pix_fmt != "yuv420p" || !video.decodable {
        return Err(format!(
            "video is {} {}, not H.264 yuv420p",
            video.codec, video.pix_fmt
        ));
    }
    if video.width == 0
        || video.height == 0
        || video.width > expected.max_width
        || video.height > expected.max_height
    {
        return Err(format!(
            "video is {}x{}, outside 1x1..{}x{}",
            video.width, video.height, expected.max_width, expected.max_height
        ));
    }
    match (&info.audio, expected.audio) {
        (Some(a), _) if a.codec != "aac" => {
            return Err(format!("audio is {}, not AAC", a.codec));
        }
        (None, true) => return Err("the source has sound; the result has none".into()),
        _ => {}
    }
    if expected.duration_secs > 0.0 {
        // A transcode keeps the duration to a frame or an audio packet;
        // the slack covers containers that count from their first key
        // frame, not a cut or a different movie.
        let slack = (expected.duration_secs * 0.03).max(1.5);
        if (info.duration_secs - expected.duration_secs).abs() > slack {
            return Err(format!(
                "lasts {:.1} s; the source lasts {:.1} s",
                info.duration_secs, expected.duration_secs
            ));
        }
    }
    Ok(info)
}

/// The four-letter names of the file's top-level boxes, in order; an error
/// for a box running past the end of the file.
fn top_level_boxes(path: &Path) -> std::io::Result<Vec<String>> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut at = 0u64;
    let mut out = Vec::new();
    while at < len {
        let mut head = [0u8; 8];
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut head)?;
        let mut size = u64::from(u32::from_be_bytes([head[0], head[1], head[2], head[3]]));
        let mut header = 8;
        if size == 1 {
            let mut large = [0u8; 8];
            f.read_exact(&mut large)?;
            size = u64::from_be_bytes(large);
            header = 16;
        } else if size == 0 {
            size = len - at;
        }
        if size < header || at + size > len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("box at byte {at} runs past the end of the file"),
            ));
        }
        out.push(String::from_utf8_lossy(&head[4..8]).into_owned());
        // Thousands of boxes are no MP4 a transcode made.
        if out.len() > 10_000 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "too many top-level boxes",
            ));
        }
        at += size;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f
    }

    fn expected() -> Expected {
        Expected {
            duration_secs: 2.0,
            max_width: 1280,
            max_height: 720,
            audio: false,
        }
    }

    #[test]
    fn boxes_running_past_the_end_are_refused() {
        let f = write(&[0, 0, 0, 16, b'f', b't', b'y', b'p', 0, 0]);
        let e = check_output(f.path(), &expected()).unwrap_err();
        assert!(e.contains("not a whole MP4"), "{e}");
    }

    #[test]
    fn moov_after_mdat_is_refused_before_probing() {
        let mut bytes = Vec::new();
        for name in [b"ftyp", b"mdat", b"moov"] {
            bytes.extend_from_slice(&[0, 0, 0, 8]);
            bytes.extend_from_slice(name);
        }
        let e = check_output(write(&bytes).path(), &expected()).unwrap_err();
        assert!(e.contains("moov comes after mdat"), "{e}");
    }

    #[test]
    fn garbage_is_refused() {
        let e = check_output(write(&[7u8; 4096]).path(), &expected()).unwrap_err();
        assert!(!e.is_empty());
    }
}
