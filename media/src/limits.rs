//! Upload policy: what the site accepts, checked on a [`ProbeInfo`].
//!
//! Probing already refuses what no configuration could make acceptable
//! (non-media, still images, truncated files, absurd header dimensions).
//! [`validate`] applies the operator's limits on top, so the same probe
//! result can be checked against different limits (e.g. per account tier)
//! without reopening the file.

use super::probe::{is_image_demuxer, MAX_INPUT_DIMENSION, MAX_INPUT_PIXELS};
use super::{MediaError, ProbeInfo};

/// Largest output bounding box a [`Profile`](super::Profile) may ask for:
/// Second Life media textures are at most 2048 px on a side.
pub const MAX_OUTPUT_DIMENSION: u32 = 2048;

/// Configurable input limits. Defaults suit a small hosting site.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest upload in bytes (default 2 GiB). Check it while the upload
    /// streams in, too; this is the backstop.
    pub max_bytes: u64,
    /// Longest movie in seconds (default 4 h).
    pub max_duration_secs: f64,
    /// Largest stored picture, either orientation (default 4096x4096, so a
    /// portrait 4K phone clip passes). Values above
    /// [`MAX_INPUT_DIMENSION`](super::MAX_INPUT_DIMENSION) are treated as it.
    pub max_width: u32,
    pub max_height: u32,
    /// Accepted containers, matched against every name in FFmpeg's demuxer
    /// name (`mov,mp4,m4a,3gp,3g2,mj2` is accepted by `mp4` or `mov`). Can
    /// only narrow the built-in demuxer allow-list, never widen it.
    pub allowed_containers: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 2 << 30,
            max_duration_secs: 4.0 * 3600.0,
            max_width: 4096,
            max_height: 4096,
            allowed_containers: [
                "mp4", "mov", "3gp", "matroska", "webm", "avi", "flv", "mpegts", "ogg", "mpeg",
                "asf",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        }
    }
}

/// Codecs that store single pictures; a "video" of one such frame is a photo.
const IMAGE_CODECS: &[&str] = &[
    "mjpeg", "png", "bmp", "gif", "tiff", "webp", "jpeg2000", "jpegls", "jpegxl", "ljpeg", "qoi",
];

/// Check a probed upload against `limits`. `file_len` is the size on disk.
///
/// Order is chosen so the uploader hears the most useful reason first: an
/// MP3 is "audio only" rather than "container not accepted".
pub fn validate(info: &ProbeInfo, file_len: u64, limits: &Limits) -> Result<(), MediaError> {
    if file_len == 0 {
        return Err(MediaError::EmptyFile);
    }
    if file_len > limits.max_bytes {
        return Err(MediaError::TooLarge {
            bytes: file_len,
            max: limits.max_bytes,
        });
    }
    let Some(video) = &info.video else {
        return Err(if info.audio.is_some() {
            MediaError::NoVideo
        } else {
            MediaError::NoStreams
        });
    };
    if is_image_demuxer(&info.format_name) {
        return Err(MediaError::StillImage {
            format: info.format_name.clone(),
        });
    }
    let names = || info.format_name.split(',').chain([info.container.as_str()]);
    if !names().any(|n| !n.is_empty() && limits.allowed_containers.iter().any(|a| a == n)) {
        return Err(MediaError::ContainerNotAllowed {
            container: info.container.clone(),
        });
    }
    let image_codec = IMAGE_CODECS.contains(&video.codec.as_str());
    if video.frame_count == 1 || (image_codec && info.duration_secs < 0.5) {
        return Err(MediaError::StillImage {
            format: video.codec.clone(),
        });
    }

    let max_w = limits.max_width.min(MAX_INPUT_DIMENSION);
    let max_h = limits.max_height.min(MAX_INPUT_DIMENSION);
    let (w, h) = (video.width, video.height);
    let fits = (w <= max_w && h <= max_h) || (w <= max_h && h <= max_w);
    let pixels = u64::from(w) * u64::from(h);
    if !fits || pixels > u64::from(max_w) * u64::from(max_h) || pixels > MAX_INPUT_PIXELS {
        return Err(MediaError::TooWide {
            width: w,
            height: h,
            max_width: max_w,
            max_height: max_h,
        });
    }
    if w == 0 || h == 0 {
        return Err(MediaError::corrupt("video stream", "unknown frame size"));
    }

    if !info.duration_secs.is_finite() || info.duration_secs > limits.max_duration_secs {
        return Err(MediaError::TooLong {
            secs: info.duration_secs,
            max: limits.max_duration_secs,
        });
    }

    if !video.decodable {
        return Err(MediaError::UnsupportedCodec {
            codec: video.codec.clone(),
        });
    }
    if let Some(audio) = info.audio.as_ref().filter(|a| !a.decodable) {
        return Err(MediaError::UnsupportedCodec {
            codec: audio.codec.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AudioInfo, VideoInfo};

    fn info() -> ProbeInfo {
        ProbeInfo {
            container: "mp4".into(),
            format_name: "mov,mp4,m4a,3gp,3g2,mj2".into(),
            duration_secs: 60.0,
            video: Some(VideoInfo {
                codec: "h264".into(),
                width: 1920,
                height: 1080,
                decodable: true,
                ..Default::default()
            }),
            audio: Some(AudioInfo {
                codec: "aac".into(),
                decodable: true,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn code(i: &ProbeInfo, len: u64, l: &Limits) -> &'static str {
        validate(i, len, l).err().map_or("ok", |e| e.code())
    }

    #[test]
    fn limits() {
        let l = Limits::default();
        assert_eq!(code(&info(), 1000, &l), "ok");
        assert_eq!(code(&info(), 0, &l), "empty_file");
        assert_eq!(code(&info(), (2 << 30) + 1, &l), "too_large");

        let mut long = info();
        long.duration_secs = 4.0 * 3600.0 + 1.0;
        assert_eq!(code(&long, 1000, &l), "too_long");

        let mut wide = info();
        wide.video.as_mut().unwrap().width = 4100;
        assert_eq!(code(&wide, 1000, &l), "too_wide");
        // Portrait 4K fits a 4096x2160 box in either orientation.
        let mut portrait = info();
        let v = portrait.video.as_mut().unwrap();
        (v.width, v.height) = (2160, 3840);
        let box4k = Limits {
            max_width: 3840,
            max_height: 2160,
            ..Limits::default()
        };
        assert_eq!(code(&portrait, 1000, &box4k), "ok");
        // Configured limits above the hard cap are capped.
        let mut huge = info();
        let v = huge.video.as_mut().unwrap();
        (v.width, v.height) = (8200, 100);
        let lax = Limits {
            max_width: 100_000,
            max_height: 100_000,
            ..Limits::default()
        };
        assert_eq!(code(&huge, 1000, &lax), "too_wide");

        let mut audio_only = info();
        audio_only.video = None;
        assert_eq!(code(&audio_only, 1000, &l), "no_video");
        audio_only.audio = None;
        assert_eq!(code(&audio_only, 1000, &l), "no_streams");

        let mut gif = info();
        gif.container = "gif".into();
        gif.format_name = "gif".into();
        assert_eq!(code(&gif, 1000, &l), "container_not_allowed");
        let only_mkv = Limits {
            allowed_containers: vec!["matroska".into()],
            ..Limits::default()
        };
        assert_eq!(code(&info(), 1000, &only_mkv), "container_not_allowed");

        let mut photo = info();
        photo.video.as_mut().unwrap().codec = "mjpeg".into();
        photo.duration_secs = 0.04;
        assert_eq!(code(&photo, 1000, &l), "still_image");
        let mut one_frame = info();
        one_frame.video.as_mut().unwrap().frame_count = 1;
        assert_eq!(code(&one_frame, 1000, &l), "still_image");

        let mut exotic = info();
        exotic.video.as_mut().unwrap().decodable = false;
        assert_eq!(code(&exotic, 1000, &l), "unsupported_codec");
    }
}
