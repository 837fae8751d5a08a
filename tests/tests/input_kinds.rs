//! What uploaders bring: several containers and codecs, each published on
//! both mirrors and played through its media URL as H.264 + AAC with `moov`
//! before `mdat`. (The media module's own tests cover every kind in detail;
//! this proves the whole path carries them.)

use std::{process::Command, time::Duration};

use e2e::{ffmpeg, mp4_top_level_boxes, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mp4_mkv_avi_and_mov_uploads_all_play() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let dir = cluster.dir.path();
    let video = [
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=480x270:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=500",
        "-t",
        "2",
    ];
    let kinds: [(&str, &[&str]); 4] = [
        (
            "remux.mp4",
            &["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"],
        ),
        (
            "h264-ac3.mkv",
            &["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "ac3"],
        ),
        ("mpeg4-mp3.avi", &["-c:v", "mpeg4", "-c:a", "libmp3lame"]),
        (
            "pcm.mov",
            &[
                "-c:v",
                "libx264",
                "-pix_fmt",
                "yuv420p",
                "-c:a",
                "pcm_s16le",
            ],
        ),
    ];
    let mut ids = Vec::new();
    for (name, codecs) in kinds {
        let path = dir.join(name);
        let mut args: Vec<&str> = video.to_vec();
        args.extend_from_slice(codecs);
        args.push(path.to_str().unwrap());
        ffmpeg(&args);
        let (status, body) = cluster.upload(&path, name).await.unwrap();
        assert_eq!(status, 202, "{name}: {body}");
        ids.push((name, body["asset_id"].as_str().unwrap().to_string()));
    }
    let client = cluster.client();
    for (name, id) in ids {
        let asset = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
        assert_eq!(asset["state"], "published", "{name}: {asset}");
        let media_url = asset["media_url"].as_str().unwrap();
        let movie = client
            .get(media_url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let boxes = mp4_top_level_boxes(&movie);
        let (moov, mdat) = (
            boxes.iter().position(|b| b == "moov").unwrap(),
            boxes.iter().position(|b| b == "mdat").unwrap(),
        );
        assert!(moov < mdat, "{name}: {boxes:?}");
        let probe = Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "stream=codec_name",
                "-of",
                "csv=p=0",
            ])
            .arg(media_url)
            .output()
            .unwrap();
        let codecs = String::from_utf8_lossy(&probe.stdout).to_string();
        assert!(
            codecs.contains("h264") && codecs.contains("aac"),
            "{name}: {codecs}"
        );
        // Seeking through the media URL works (ffmpeg -ss issues a range).
        let seek = Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-ss",
                "1.2",
                "-i",
                media_url,
                "-frames:v",
                "1",
                "-f",
                "null",
                "-",
            ])
            .output()
            .unwrap();
        assert!(
            seek.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&seek.stderr)
        );
    }
}
