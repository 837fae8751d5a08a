//! Playback as real clients see it (issue 6): the signed media URL at the
//! manager (403/410 with codes), `curl` against RFC 9110's range rules on a
//! node, and VLC — the libVLC the Second Life viewer plays media with —
//! playing the media URL and seeking.

use std::{
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use e2e::{ffmpeg, Cluster, ClusterOpts};
use shared::PlaybackClaims;

/// A seekable H.264/AAC MP4 of `secs` seconds with a moving picture,
/// remuxed by the manager, not transcoded, so tests spend their time on
/// playback. `dense` spends the manager's whole copy bit rate (noise at
/// 7 Mbit/s, still under its 8 Mbit/s limit) for a movie larger than a
/// player's read-ahead.
fn make_mp4(path: &Path, secs: u32, dense: bool) {
    let secs = secs.to_string();
    let mut args = vec![
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        &secs,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
    ];
    if dense {
        args.extend([
            "-vf",
            "noise=alls=40:allf=t",
            "-g",
            "100",
            "-b:v",
            "7M",
            "-minrate",
            "7M",
            "-maxrate",
            "7M",
            "-bufsize",
            "7M",
        ]);
    } else {
        args.extend(["-b:v", "1500k"]);
    }
    args.extend([
        "-c:a",
        "aac",
        "-movflags",
        "+faststart",
        path.to_str().unwrap(),
    ]);
    ffmpeg(&args);
}

async fn published(cluster: &Cluster) -> (String, String) {
    published_movie(cluster, 20, false).await
}

async fn published_movie(cluster: &Cluster, secs: u32, dense: bool) -> (String, String) {
    let input = cluster.dir.path().join("seekable.mp4");
    make_mp4(&input, secs, dense);
    let (status, body) = cluster.upload(&input, "Seekable").await.unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["asset_id"].as_str().unwrap().to_string();
    let asset = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(asset["state"], "published", "{asset}");
    (id, asset["media_url"].as_str().unwrap().to_string())
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not a JSON error: {body}"));
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

/// The media URL's token is checked by the manager before anything else:
/// forged → 403, expired → 410, for another movie → 403, none → 403, each
/// with its code, for GET and HEAD alike; a node says the same of an
/// expired token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_urls_carry_a_signed_expiring_token_checked_by_manager_and_nodes() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let (id, media_url) = published(&cluster).await;
    assert!(media_url.len() <= 1024, "{} chars", media_url.len());
    let base = format!("{}/media/", cluster.manager.url);
    let token = media_url
        .strip_prefix(&base)
        .and_then(|r| r.strip_suffix(&format!("/{id}.mp4")))
        .unwrap_or_else(|| panic!("media URL shape: {media_url}"))
        .to_string();
    let claims = cluster
        .token_signer
        .verifier()
        .verify(&token, shared::runtime::unix_now())
        .expect("the manager's own token verifies");
    assert_eq!(claims.asset_id, id);

    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let expired = cluster.token_signer.sign(&PlaybackClaims {
        expires_at: shared::runtime::unix_now() - 1,
        ..claims.clone()
    });
    let other_asset = cluster.token_signer.sign(&PlaybackClaims {
        asset_id: "0".repeat(32),
        ..claims.clone()
    });
    let forged = shared::TokenSigner::generate().sign(&claims);
    // One flipped character in the signature.
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let cases = [
        (
            format!("{base}{forged}/{id}.mp4"),
            403,
            "token_bad_signature",
        ),
        (
            format!("{base}{tampered}/{id}.mp4"),
            403,
            "token_bad_signature",
        ),
        (format!("{base}{expired}/{id}.mp4"), 410, "token_expired"),
        (
            format!("{base}{other_asset}/{id}.mp4"),
            403,
            "token_wrong_asset",
        ),
        (
            format!("{base}not-a-token/{id}.mp4"),
            403,
            "token_malformed",
        ),
        (format!("{base}{id}.mp4"), 403, "token_missing"),
    ];
    for (url, status, code) in &cases {
        let r = no_follow.get(url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), *status, "GET {url}");
        assert_eq!(error_code(&r.text().await.unwrap()), *code, "GET {url}");
        let r = no_follow.head(url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), *status, "HEAD {url}");
    }

    // The genuine URL: HEAD answered by the manager, GET redirected to a
    // node with the same token.
    let r = no_follow.head(&media_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "video/mp4");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    let location = cluster.redirect_location(&media_url).await;
    assert!(
        location.contains(&format!("/play/{token}/{id}.mp4")),
        "{location}"
    );

    // `?viewer=` chooses as if for that address (London → toronto); a bad
    // one is refused with a code.
    let r = no_follow
        .get(format!("{media_url}?viewer=81.2.69.142"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let toronto = &cluster
        .nodes
        .iter()
        .find(|n| n.proc.name == "toronto")
        .unwrap()
        .proc
        .url;
    assert!(r.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with(toronto.as_str()));
    let r = no_follow
        .get(format!("{media_url}?viewer=london"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(&r.text().await.unwrap()), "bad_viewer");

    // A node refuses the expired token on its own, with the same code.
    let node_expired = location.replace(&token, &expired);
    let r = no_follow.get(&node_expired).send().await.unwrap();
    assert_eq!(r.status(), 410);
    assert_eq!(error_code(&r.text().await.unwrap()), "token_expired");

    // No token reached a log, at the manager or a node.
    for (name, log) in std::iter::once(("manager", cluster.manager.log_text()))
        .chain(cluster.nodes.iter().map(|n| ("node", n.proc.log_text())))
    {
        for t in [&token, &expired, &forged, &other_asset] {
            assert!(!log.contains(t.as_str()), "{name} logged a token");
        }
    }
}

struct Curl {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Curl {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// With `-L`, curl writes every response's headers; the last one counts.
fn last_response(all: &str) -> String {
    let start = all.rfind("HTTP/").unwrap_or(0);
    all[start..].to_string()
}

/// `curl` with `extra` arguments; headers of the final response only.
fn curl(dir: &Path, url: &str, extra: &[&str]) -> Curl {
    let headers = dir.join("curl-headers.txt");
    let body = dir.join("curl-body.bin");
    let _ = std::fs::remove_file(&body);
    let out: Output = Command::new("curl")
        .args(["-sS", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Curl {
        status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
        headers: last_response(&std::fs::read_to_string(&headers).unwrap()),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// RFC 9110 §14 (range requests) as `curl` sees them, through the media
/// URL's redirect to a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_range_requests_follow_rfc_9110() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let (_id, media_url) = published(&cluster).await;
    let dir = cluster.dir.path();
    let node_url = cluster.redirect_location(&media_url).await;

    // Following the redirect, as a player does.
    let full = curl(dir, &media_url, &["-L"]);
    assert_eq!(full.status, 200);
    let len = full.body.len() as u64;
    assert!(len > 1_000_000, "{len}");
    assert_eq!(full.header("content-length"), Some(len.to_string()));
    assert_eq!(full.header("content-type").as_deref(), Some("video/mp4"));
    assert_eq!(full.header("accept-ranges").as_deref(), Some("bytes"));
    let cache = full.header("cache-control").unwrap_or_default();
    assert!(
        cache.contains("private"),
        "paid content is not for shared caches: {cache}"
    );
    let etag = full.header("etag").expect("ETag");
    assert!(
        etag.starts_with('"'),
        "a strong validator, usable in If-Range: {etag}"
    );

    // Satisfiable single ranges: 206, Content-Range, exactly those bytes.
    let slice = |a: u64, b: u64| full.body[a as usize..=b as usize].to_vec();
    for (range, a, b) in [
        ("0-0", 0, 0),
        ("0-99", 0, 99),
        ("1000-", 1000, len - 1),
        ("-500", len - 500, len - 1),
        // A last-byte-pos past the end is clamped, not refused (§14.1.2).
        (
            &*format!("{}-{}", len - 10, len + 1_000_000),
            len - 10,
            len - 1,
        ),
        // A suffix longer than the file means the whole file (§14.1.2).
        (&*format!("-{}", len + 5), 0, len - 1),
    ] {
        let r = curl(dir, &node_url, &["-r", range]);
        assert_eq!(r.status, 206, "bytes={range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {a}-{b}/{len}")),
            "bytes={range}"
        );
        assert_eq!(r.header("content-length"), Some((b - a + 1).to_string()));
        assert!(r.body == slice(a, b), "bytes={range}: wrong bytes");
    }

    // Unsatisfiable: 416 with `Content-Range: bytes */len` (§15.5.17).
    for range in [
        format!("{len}-"),
        format!("{}-{}", len + 10, len + 20),
        "-0".into(),
    ] {
        let r = curl(dir, &node_url, &["-r", &range]);
        assert_eq!(r.status, 416, "bytes={range}");
        assert_eq!(r.header("content-range"), Some(format!("bytes */{len}")));
    }

    // A Range header the server cannot use is ignored: the whole 200
    // (§14.2: invalid syntax, an unknown unit, first > last).
    for header in ["Range: bytes=20-10", "Range: items=0-5", "Range: bytes=abc"] {
        let r = curl(dir, &node_url, &["-H", header]);
        assert_eq!(r.status, 200, "{header}");
        assert_eq!(r.body.len() as u64, len, "{header}");
    }
    // Several ranges: the server may send the whole representation instead.
    let r = curl(dir, &node_url, &["-r", "0-1,5-6"]);
    assert!(r.status == 200 && r.body.len() as u64 == len || r.status == 206);

    // If-Range (§13.1.5): the current ETag gets the range; a stale one or a
    // date gets the whole new representation.
    let r = curl(
        dir,
        &node_url,
        &["-r", "10-19", "-H", &format!("If-Range: {etag}")],
    );
    assert_eq!((r.status, r.body.clone()), (206, slice(10, 19)));
    let r = curl(
        dir,
        &node_url,
        &["-r", "10-19", "-H", "If-Range: \"stale\""],
    );
    assert_eq!((r.status, r.body.len() as u64), (200, len));
    let r = curl(
        dir,
        &node_url,
        &[
            "-r",
            "10-19",
            "-H",
            "If-Range: Tue, 01 Jan 2030 00:00:00 GMT",
        ],
    );
    assert_eq!((r.status, r.body.len() as u64), (200, len));

    // HEAD with a range: the same status line and headers, no body.
    let r = reqwest::Client::new()
        .head(&node_url)
        .header("Range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 0-99/{len}").as_str()
    );
    assert!(r.bytes().await.unwrap().is_empty());
}

/// A stand-in for the site's reverse proxy: forwards each connection to
/// `upstream`, adding `X-Forwarded-For: {viewer}` to the request head, as
/// a real proxy in front of the manager would (the harness trusts
/// 127.0.0.0/8 as a proxy). This is how a test gives VLC a client address.
async fn forwarding_proxy(upstream: String, viewer: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = upstream.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line_end = head.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
                let mut forwarded = head[..line_end].to_vec();
                forwarded.extend_from_slice(format!("X-Forwarded-For: {viewer}\r\n").as_bytes());
                forwarded.extend_from_slice(&head[line_end..]);
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                if server.write_all(&forwarded).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

/// VLC (`cvlc`, libVLC 3 as in the Second Life viewer) plays the media URL
/// with its MP4 demuxer, for a viewer in London behind the site's proxy:
/// it must follow the redirect to the nearest node (toronto, not the
/// fallback utah), start 25 s in — a seek, so a byte range well into the
/// file — and decode pictures there, which it writes out and we check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vlc_plays_the_media_url_from_the_nearest_node_and_seeks() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    // About 26 MB: VLC reads ahead up to 16 MiB, and a movie that fits
    // could be swallowed whole before the seek, which then needs no range.
    // In-world movies are far larger than that read-ahead, like this one.
    let (id, media_url) = published_movie(&cluster, 30, true).await;
    let proxy = forwarding_proxy(cluster.manager.url.clone(), "81.2.69.142").await;
    let via_proxy = media_url.replacen(&cluster.manager.url, &proxy, 1);
    let frames = tempfile::Builder::new()
        .prefix("vlc-frames")
        .tempdir()
        .unwrap();
    let out = vlc(
        &[
            "--intf=dummy",
            "--vout=dummy",
            "--aout=dummy",
            "--no-video-title-show",
            "--demux=mp4",
            "--start-time=25",
            "--run-time=2",
            "--play-and-exit",
            "--video-filter=scene",
            "--scene-format=png",
            "--scene-ratio=5",
            "--scene-prefix=frame-",
            &format!("--scene-path={}", frames.path().display()),
            "-vv",
        ],
        via_proxy,
        frames.path(),
    )
    .await;
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    std::fs::write(cluster.dir.path().join("vlc.log"), &log).unwrap();
    assert!(out.status.success(), "cvlc failed:\n{log}");

    // Redirected to the node nearest London.
    let node = |name: &str| {
        &cluster
            .nodes
            .iter()
            .find(|n| n.proc.name == name)
            .unwrap()
            .proc
    };
    let toronto = node("toronto");
    assert!(
        log.contains(&format!("redirecting to: {}/play/", toronto.url)),
        "VLC was not sent to toronto:\n{log}"
    );
    // Its MP4 demuxer opened the movie.
    assert!(log.contains("using demux module \"mp4\""), "{log}");
    // The seek: a request for a range starting past half the file, answered
    // 206 with a matching Content-Range.
    let len: u64 = reqwest::Client::new()
        .head(&media_url)
        .send()
        .await
        .unwrap()
        .headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // (VLC also probes `bytes={len}-` once, answered 416; not a seek.)
    let seek_from = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Range: bytes="))
        .filter_map(|r| r.strip_suffix('-')?.parse::<u64>().ok())
        .filter(|&from| from < len)
        .max()
        .unwrap_or_else(|| panic!("VLC made no range request:\n{log}"));
    assert!(
        seek_from > len * 2 / 3,
        "seeking to 25 s of 30 s should start past two thirds: {seek_from} of {len}\n{log}"
    );
    assert!(
        log.contains(&format!(
            "content-range: bytes {seek_from}-{}/{len}",
            len - 1
        )),
        "{log}"
    );
    for bad in [
        "mp4 demux error",
        "avcodec decoder error",
        "http stream error",
    ] {
        assert!(!log.contains(bad), "VLC reported `{bad}`:\n{log}");
    }
    // It decoded pictures there, at the movie's size.
    let pngs: Vec<Vec<u8>> = std::fs::read_dir(frames.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert!(
        pngs.len() >= 3,
        "only {} frames decoded:\n{log}",
        pngs.len()
    );
    for png in &pngs {
        // IHDR: width and height, big-endian, at bytes 16..24.
        let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
        // VLC's snapshot module writes 640x360 H.264 as 640x386 even from
        // a local file (it rounds the coded 368 rows through the aspect
        // ratio), so the height is checked loosely.
        assert!(w == 640 && (360..=400).contains(&h), "{w}x{h}");
    }
    // And the bytes came from toronto; utah served nothing of this movie.
    assert!(toronto
        .log_text()
        .contains(&format!("/play/[token]/{id}.mp4")));
    assert!(!node("utah")
        .log_text()
        .contains(&format!("/play/[token]/{id}.mp4")));
}

/// Runs `cvlc` with `args` on `url`, off the async runtime (the proxy
/// above serves it meanwhile). VLC refuses to run as root, so as root it
/// runs as `nobody`, with a home it can write to.
async fn vlc(args: &[&str], url: String, home: &Path) -> Output {
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]);
        c.arg("cvlc");
        c
    } else {
        Command::new("cvlc")
    };
    if root {
        std::os::unix::fs::chown(home, Some(65534), Some(65534)).unwrap();
    }
    cmd.args(args).arg(url).env("HOME", home);
    tokio::task::spawn_blocking(move || {
        cmd.output()
            .expect("cvlc (Debian package vlc-bin; scripts/setup test installs it)")
    })
    .await
    .unwrap()
}

/// The nearest node failing its health check: viewers go to the next one
/// (HEAD still answers 200), and back once it is healthy again. The choice
/// and its reason are counted in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_nearest_node_is_passed_over_until_it_recovers() {
    // Fixed ports: toronto comes back on the URL the manager knows.
    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.fixed_ports = true;
    let mut cluster = Cluster::start_with(&opts);
    let (_id, media_url) = published(&cluster).await;
    let london = format!("{media_url}?viewer=81.2.69.142");
    let url_of = |c: &Cluster, name: &str| {
        c.nodes
            .iter()
            .find(|n| n.proc.name == name)
            .unwrap()
            .proc
            .url
            .clone()
    };
    let (utah, toronto) = (url_of(&cluster, "utah"), url_of(&cluster, "toronto"));
    assert!(cluster
        .redirect_location(&london)
        .await
        .starts_with(&toronto));

    let t = cluster
        .nodes
        .iter()
        .position(|n| n.proc.name == "toronto")
        .unwrap();
    assert!(cluster.nodes[t].proc.stop(), "toronto stops cleanly");
    // The health monitor probes every few seconds; poll until it notices.
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    loop {
        let loc = cluster.redirect_location(&london).await;
        if loc.starts_with(&utah) {
            break;
        }
        assert!(loc.starts_with(&toronto), "{loc}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "toronto was never passed over"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let head = client.head(&london).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let body = client.get(&london).send().await.unwrap();
    assert_eq!(body.status(), 200, "played from utah");

    // Back again: toronto is chosen again once healthy.
    cluster.restart_node(t);
    let started = std::time::Instant::now();
    let toronto = url_of(&cluster, "toronto");
    while !cluster
        .redirect_location(&london)
        .await
        .starts_with(&toronto)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "toronto never came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
            .any(|l| l.starts_with("manager_redirects_total") && l.contains("node=\"toronto\"")),
        "{metrics}"
    );
}
