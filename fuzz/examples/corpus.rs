//! Writes the committed seed corpus, `fuzz/corpus/<target>/`, from real
//! values the project makes (sealed blobs, signed tokens and requests, the
//! example configurations, a real movie in a multipart body). Run once
//! after a format changes: `cargo run -p slmedia-fuzz --example corpus`
//! (the upload seed needs the `ffmpeg` command to make its movie).

use std::path::{Path, PathBuf};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("corpus");
    let key = slmedia_fuzz::data_key();
    let asset = slmedia_fuzz::ASSET;

    // Sealed blobs: empty, one byte, a few segments, a short last segment.
    for (i, (len, seg)) in [
        (0usize, 4096u32),
        (1, 4096),
        (10_000, 4096),
        (70_001, 16_384),
    ]
    .into_iter()
    .enumerate()
    {
        let plain: Vec<u8> = (0..len).map(|n| (n % 251) as u8).collect();
        let (sealed, _) = shared::seal_all(&key, asset, 1, seg, &plain);
        write(
            &dir,
            "sealed_header",
            &format!("blob-{i}"),
            &sealed[..shared::HEADER_LEN],
        );
        let mut ranged = Vec::new();
        let (a, b) = (len as u32 / 3, len as u32 - len as u32 / 4);
        ranged.extend_from_slice(&a.to_le_bytes());
        ranged.extend_from_slice(&b.to_le_bytes());
        ranged.extend_from_slice(&sealed);
        write(&dir, "open_blob", &format!("blob-{i}"), &ranged);
    }

    // Playback tokens: free, paid, with an epoch.
    let signer = slmedia_fuzz::token_signer();
    let master = shared::MasterKey::new(1, [9; 32]);
    for (i, (grant, epoch)) in [(None, 0), (Some("grant-1".to_string()), 0), (None, 3)]
        .into_iter()
        .enumerate()
    {
        let claims = shared::PlaybackClaims {
            asset_id: asset.into(),
            blob: shared::BlobId::of(b"a blob"),
            wrapped_key: master.wrap(asset, &key),
            expires_at: 4_102_444_800,
            grant,
            epoch,
        };
        write(
            &dir,
            "playback_token",
            &format!("token-{i}"),
            signer.sign(&claims).as_bytes(),
        );
    }

    // Node requests: a journal post and an inventory read, signed.
    for (i, (method, path, body)) in [
        ("POST", "/internal/v1/nodes/utah/journal", &b"{}"[..]),
        ("GET", "/internal/v1/inventory", &b""[..]),
    ]
    .into_iter()
    .enumerate()
    {
        let sha = shared::content_sha256_hex(body);
        let now = 1_800_000_000;
        let auth =
            shared::sign_request(&slmedia_fuzz::NODE_SECRET, "utah", method, path, now, &sha);
        write(
            &dir,
            "node_request",
            &format!("request-{i}"),
            format!("{auth}\n{method}\n{path}\n{now}\n{sha}").as_bytes(),
        );
    }

    // Range headers, the forms players send.
    for (i, (len, range, if_range)) in [
        (1000u64, "bytes=0-", ""),
        (1000, "bytes=500-999", ""),
        (1000, "bytes=-100", ""),
        (0, "bytes=-5", ""),
        (1 << 30, "bytes=1048576-2097151", "\"etag\""),
        (1000, "bytes=0-1,5-6", ""),
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(range.as_bytes());
        if !if_range.is_empty() {
            b.push(b'\n');
            b.extend_from_slice(if_range.as_bytes());
        }
        write(&dir, "range_header", &format!("range-{i}"), &b);
    }

    // Configurations: the examples shipped with each binary.
    let repo = root.parent().unwrap();
    for (i, file) in [
        "manager/manager.example.toml",
        "viewnode/viewnode.example.toml",
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = vec![i as u8];
        b.extend_from_slice(&std::fs::read(repo.join(file)).unwrap());
        write(&dir, "config", &format!("example-{i}"), &b);
    }

    // Node bodies: a journal delivery and a copy report.
    let batch = shared::protocol::JournalBatch {
        events: vec![shared::protocol::JournalEvent {
            id: "0b5e9a0c-2f4e-4b8e-9c1a-6f1d2e3c4b5a".into(),
            grant: Some("grant-1".into()),
            asset: asset.into(),
            bytes: 1_048_576,
            first_at: 1_800_000_000,
            last_at: 1_800_000_010,
        }],
        watermark: 1_800_000_000,
        now: 1_800_000_011,
    };
    let mut b = vec![0u8];
    b.extend_from_slice(&serde_json::to_vec(&batch).unwrap());
    write(&dir, "node_bodies", "journal", &b);
    let report = shared::protocol::NodeReport {
        events: vec![shared::protocol::NodeReportEvent {
            kind: "quarantined".into(),
            blob: shared::BlobId::of(b"a blob").to_string(),
            reason: "scrub_mismatch".into(),
            at: 1_800_000_000,
        }],
    };
    let mut b = vec![1u8];
    b.extend_from_slice(&serde_json::to_vec(&report).unwrap());
    write(&dir, "node_bodies", "events", &b);

    // Terminal forms, one per call.
    for (i, form) in [
        "terminal=t1&asset=a1&avatar=00000000-0000-0000-0000-000000000001&ts=1800000000&nonce=n1",
        "terminal=t1&asset=a1&avatar=00000000-0000-0000-0000-000000000001&request=r1&ts=1800000000&nonce=n2",
        "terminal=t1&avatar=00000000-0000-0000-0000-000000000001&code=ABCD-EFGH&ts=1800000000&nonce=n3",
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = vec![i as u8];
        b.extend_from_slice(form.as_bytes());
        write(&dir, "terminal_form", &format!("form-{i}"), &b);
    }

    // Uploads: a real short movie, and a form with only a title.
    let tmp = tempfile::tempdir().unwrap();
    let movie = tmp.path().join("m.webm");
    let made = std::process::Command::new("ffmpeg")
        .args([
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x48:rate=5:duration=1",
        ])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:duration=1"])
        .args([
            "-c:v",
            "libvpx",
            "-b:v",
            "50k",
            "-c:a",
            "libopus",
            "-shortest",
        ])
        .arg(&movie)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut form =
        b"--XyZ\r\ncontent-disposition: form-data; name=\"title\"\r\n\r\nA movie\r\n".to_vec();
    let mut title_only = form.clone();
    title_only.extend_from_slice(b"--XyZ--\r\n");
    write(&dir, "upload", "title-only", &title_only);
    if made {
        form.extend_from_slice(
            b"--XyZ\r\ncontent-disposition: form-data; name=\"file\"; filename=\"m.webm\"\r\ncontent-type: video/webm\r\n\r\n",
        );
        form.extend_from_slice(&std::fs::read(&movie).unwrap());
        form.extend_from_slice(b"\r\n--XyZ--\r\n");
        write(&dir, "upload", "movie", &form);
    } else {
        eprintln!("no ffmpeg command: the upload corpus has no movie");
    }
}
