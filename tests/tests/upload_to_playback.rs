//! The whole path, real: upload → probe → transcode → seal → two mirrors →
//! media URL → ranged playback.

use std::{process::Command, time::Duration};

use e2e::{files_under, make_webm, mp4_top_level_boxes, Cluster};
use sha2::{Digest, Sha256};

async fn get_range(
    client: &reqwest::Client,
    url: &str,
    range: &str,
) -> (u16, Option<String>, Vec<u8>) {
    let r = client
        .get(url)
        .header("Range", range)
        .send()
        .await
        .expect("range request");
    let status = r.status().as_u16();
    let cr = r
        .headers()
        .get("content-range")
        .map(|v| v.to_str().unwrap().to_string());
    (status, cr, r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webm_upload_is_published_on_two_mirrors_and_plays_with_ranges() {
    // Reads the nodes' files: both on local disk.
    let cluster = Cluster::start_local(&["utah", "toronto"]);
    let input = cluster.dir.path().join("holiday.webm");
    make_webm(&input);

    let (status, body) = cluster.upload(&input, "Holiday").await.unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["asset_id"].as_str().expect("asset_id").to_string();
    assert_eq!(body["status_url"], format!("/api/v1/assets/{id}"));

    let asset = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(asset["state"], "published", "{asset}");
    assert!(asset["error"].is_null());
    let replicas = asset["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{asset}");
    assert!(replicas.iter().all(|r| r["state"] == "verified"), "{asset}");
    let media_url = asset["media_url"].as_str().expect("media_url").to_string();
    assert!(media_url.len() <= 1024);

    // Both nodes hold the sealed blob, named by its SHA-256, and nothing on
    // their disks carries MP4 structure in the clear.
    let mut blob_names = Vec::new();
    for node in &cluster.nodes {
        let blobs: Vec<_> = files_under(&node.storage.join("blobs"));
        assert_eq!(blobs.len(), 1, "{}: {blobs:?}", node.proc.name);
        let data = std::fs::read(&blobs[0]).unwrap();
        let name = blobs[0].file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(
            name,
            hex::encode(Sha256::digest(&data)),
            "blob named by its hash"
        );
        blob_names.push(name);
        for f in files_under(&node.storage) {
            let bytes = std::fs::read(&f).unwrap();
            for needle in [&b"ftyp"[..], b"moov", b"mdat"] {
                assert!(
                    !bytes.windows(4).any(|w| w == needle),
                    "{} holds plaintext {:?}",
                    f.display(),
                    String::from_utf8_lossy(needle)
                );
            }
        }
    }
    assert_eq!(blob_names[0], blob_names[1]);

    // HEAD on the media URL is answered directly with what the SL viewer's
    // probe needs.
    let client = cluster.client();
    let head = client.head(&media_url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-type"], "video/mp4");
    assert_eq!(head.headers()["accept-ranges"], "bytes");
    let len: usize = head.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(len > 10_000);

    // GET redirects to a node; the whole movie comes back.
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow.get(&media_url).send().await.unwrap();
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        cluster
            .nodes
            .iter()
            .any(|n| location.starts_with(&n.proc.url)),
        "{location}"
    );
    let full = client.get(&media_url).send().await.unwrap();
    assert_eq!(full.status(), 200);
    assert_eq!(full.headers()["content-type"], "video/mp4");
    let movie = full.bytes().await.unwrap().to_vec();
    assert_eq!(movie.len(), len);
    let boxes = mp4_top_level_boxes(&movie);
    let moov = boxes.iter().position(|b| b == "moov").expect("moov box");
    let mdat = boxes.iter().position(|b| b == "mdat").expect("mdat box");
    assert!(moov < mdat, "moov must precede mdat (faststart): {boxes:?}");
    assert_eq!(boxes[0], "ftyp");

    // Ranged reads through the redirect, and directly against *each* node
    // with the same token: every copy decrypts to the same bytes.
    let mid = len / 2;
    let cases = [
        ("bytes=0-99".to_string(), 0..100),
        (format!("bytes={}-{}", mid, mid + 70_000), mid..mid + 70_001),
        ("bytes=-500".to_string(), len - 500..len),
        (format!("bytes={}-", len - 300), len - 300..len),
    ];
    let path = &location[location.find("/play/").unwrap()..];
    let mut urls = vec![media_url.clone()];
    urls.extend(
        cluster
            .nodes
            .iter()
            .map(|n| format!("{}{}", n.proc.url, path)),
    );
    for url in &urls {
        for (range, want) in &cases {
            let (status, cr, bytes) = get_range(&client, url, range).await;
            assert_eq!(status, 206, "{range} on {url}");
            assert_eq!(
                cr.unwrap(),
                format!("bytes {}-{}/{len}", want.start, want.end - 1)
            );
            assert_eq!(&bytes[..], &movie[want.clone()], "{range} on {url}");
        }
        let (status, cr, _) = get_range(&client, url, &format!("bytes={len}-")).await;
        assert_eq!(status, 416);
        assert_eq!(cr.unwrap(), format!("bytes */{len}"));
    }

    // ffprobe reads the media URL itself (following the redirect).
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name,pix_fmt,width,height",
            "-of",
            "json",
        ])
        .arg(&media_url)
        .output()
        .expect("ffprobe");
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    let codecs: Vec<&str> = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["codec_name"].as_str())
        .collect();
    assert!(codecs.contains(&"h264") && codecs.contains(&"aac"), "{v}");
    let video = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["codec_name"] == "h264")
        .unwrap();
    assert_eq!(video["pix_fmt"], "yuv420p");
    assert_eq!(
        (video["width"].as_u64(), video["height"].as_u64()),
        (Some(640), Some(360))
    );

    // A bad token is refused with a code, never served.
    let forged = format!(
        "{}{}",
        cluster.nodes[0].proc.url,
        path.replacen("/play/", "/play/x", 1)
    );
    let r = client.get(&forged).send().await.unwrap();
    assert!(r.status() == 403, "{}", r.status());
    let err: serde_json::Value = r.json().await.unwrap();
    assert!(
        err["error"]["code"].as_str().unwrap().starts_with("token_"),
        "{err}"
    );

    // Tokens never reach the node logs.
    let token = path.trim_start_matches("/play/").split('/').next().unwrap();
    for node in &cluster.nodes {
        assert!(
            !node.proc.log_text().contains(token),
            "{} logged a token",
            node.proc.name
        );
    }

    // The nearest mirror: GeoIP of the viewer's address (believed from
    // X-Forwarded-For because the peer, 127.0.0.1, is a trusted proxy).
    let node_url = |name: &str| {
        cluster
            .nodes
            .iter()
            .find(|n| n.proc.name == name)
            .unwrap()
            .proc
            .url
            .clone()
    };
    for (viewer, want) in [
        (Some("216.160.83.56"), "utah"),    // Milton, WA
        (Some("175.16.199.1"), "utah"),     // Changchun
        (Some("81.2.69.142"), "toronto"),   // London
        (Some("89.160.20.112"), "toronto"), // Linköping
        (Some("10.0.0.1"), "utah"),         // unknown: fallback order
        (None, "utah"),                     // loopback: fallback order
    ] {
        let mut req = no_follow.get(&media_url);
        if let Some(ip) = viewer {
            req = req.header("X-Forwarded-For", ip);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 302);
        let loc = r.headers()["location"].to_str().unwrap();
        assert!(
            loc.starts_with(&node_url(want)),
            "{viewer:?} → {loc}, want {want}"
        );
    }
    let forced = no_follow
        .get(format!("{media_url}?node=toronto"))
        .send()
        .await
        .unwrap();
    assert!(forced.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with(&node_url("toronto")));
    let metrics = client
        .get(format!("{}/metrics", cluster.manager.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("manager_redirects_total")
                && l.contains("reason=\"nearest\"")
                && l.contains("node=\"toronto\"")),
        "{metrics}"
    );

    // The page's poster exists and is a JPEG.
    let poster = client
        .get(format!("{}/posters/{id}.jpg", cluster.manager.url))
        .send()
        .await
        .unwrap();
    assert_eq!(poster.status(), 200);
    assert_eq!(poster.headers()["content-type"], "image/jpeg");
    assert!(poster.bytes().await.unwrap().starts_with(&[0xff, 0xd8]));

    // /healthz and /metrics on every process.
    for url in
        std::iter::once(&cluster.manager.url).chain(cluster.nodes.iter().map(|n| &n.proc.url))
    {
        let h: serde_json::Value = client
            .get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(h["status"], "ok", "{url}: {h}");
        let m = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(m.contains("_http_requests_total"), "{url}: {m}");
    }

    // Every background worker has run and reports it; the one that did
    // this movie's work counted it, and none has failed or stopped.
    let (s, v) = cluster
        .get_as(&cluster.api_token, "/api/v1/admin/workers")
        .await;
    assert_eq!(s, 200, "{v}");
    let workers = v["workers"].as_array().unwrap();
    for name in [
        "transcode",
        "replication",
        "reconcile",
        "backup",
        "refunds",
        "node-monitor",
    ] {
        let w = workers
            .iter()
            .find(|w| w["name"] == name)
            .unwrap_or_else(|| panic!("no worker {name}: {v}"));
        assert!(w["runs"].as_u64().unwrap() >= 1, "{w}");
        assert_eq!(w["failures"], 0, "{w}");
        assert_ne!(w["state"], "stopped", "{w}");
    }

    // The operator's overview shows both nodes as the monitor last found
    // them, with their version and disk, from their own /healthz.
    let page = cluster
        .client()
        .get(format!("{}/admin", cluster.manager.url))
        .bearer_auth(&cluster.api_token)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    for node in ["utah", "toronto"] {
        let row = html
            .split(&format!("data-node=\"{node}\""))
            .nth(1)
            .and_then(|r| r.split("</tr>").next())
            .unwrap_or_else(|| panic!("no row for {node}: {html}"));
        assert!(row.contains(">ok<"), "{node}: {row}");
        assert!(row.contains("version "), "{node}: {row}");
        assert!(row.contains("GiB"), "{node}'s disk: {row}");
    }
    assert!(!html.contains("is down"), "{html}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_urls_handed_out_keep_playing_while_the_manager_is_down() {
    let mut cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let (_, body) = cluster.upload(&input, "Outage").await.unwrap();
    let id = body["asset_id"].as_str().unwrap().to_string();
    let asset = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    let media_url = asset["media_url"].as_str().unwrap().to_string();
    let client = cluster.client();
    let whole = client
        .get(&media_url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let location = cluster.redirect_location(&media_url).await;

    assert!(cluster.manager.stop(), "manager exits cleanly");
    assert!(
        client.head(&media_url).send().await.is_err(),
        "the manager really is down"
    );
    let (status, cr, bytes) = get_range(&client, &location, "bytes=1000-1999").await;
    assert_eq!(status, 206);
    assert_eq!(cr.unwrap(), format!("bytes 1000-1999/{}", whole.len()));
    assert_eq!(&bytes[..], &whole[1000..2000]);
    let full = client.get(&location).send().await.unwrap();
    assert_eq!(full.status(), 200);
    assert_eq!(full.bytes().await.unwrap(), whole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_file_named_mp4_is_rejected_and_leaves_nothing() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let fake = cluster.dir.path().join("notes.mp4");
    std::fs::write(
        &fake,
        "These are my shopping notes, not a movie.\n".repeat(200),
    )
    .unwrap();
    // Probing needs only the headers, so the refusal comes in the request.
    let (status, body) = cluster.upload(&fake, "Not a movie").await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "not_media", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().len() > 10,
        "{body}"
    );

    // A JPEG renamed .mp4 likewise.
    let photo = cluster.dir.path().join("photo.mp4");
    e2e::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240",
        "-frames:v",
        "1",
        "-f",
        "image2",
        "-c:v",
        "mjpeg",
        photo.to_str().unwrap(),
    ]);
    let (status, body) = cluster.upload(&photo, "A photo").await.unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "still_image", "{body}");

    // Nothing staged remains, no asset exists, no node received anything.
    assert!(files_under(&cluster.manager_data.join("staging")).is_empty());
    assert!(files_under(&cluster.manager_data.join("outbox")).is_empty());
    for node in &cluster.nodes {
        assert!(node.held_blobs().await.is_empty());
    }
    let mine = cluster.my_assets().await;
    assert_eq!(mine.len(), 0, "{mine:?}");

    // An empty upload is refused during the request with a code.
    let empty = cluster.dir.path().join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let (status, body) = cluster.upload(&empty, "Empty").await.unwrap();
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], "empty_file");

    // Unauthenticated uploads are refused.
    let r = cluster
        .client()
        .post(format!("{}/api/v1/uploads", cluster.manager.url))
        .multipart(reqwest::multipart::Form::new().text("title", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthenticated");
}
