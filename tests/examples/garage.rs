//! Garage-backed view nodes (issue 18; docs/mirrors.md "On S3: Garage"):
//!
//! - `garage serve`: a view node whose blobs are in a single-node Garage
//!   serving whole files and random 1 MiB ranges of a ~100 MiB movie
//!   (decrypting as it goes), against `wrk` fetching the same plaintext
//!   object from Garage's own website endpoint; time to first byte of a
//!   1 MiB range against the same from Garage; a push (the manager's PUT)
//!   and a refill (a GET from the other node streamed into the PUT, as a
//!   repair does) against `curl -T` of the same bytes to Garage's S3 API;
//!   the node's peak RSS.
//! - `garage cluster`: three Garage processes, replication factor 3,
//!   behind one view node; one killed; a movie published and both played
//!   while it is down; brought back; the node's scrub finds nothing wrong.
//!
//! Release binaries (`scripts/bench-garage` builds them); everything on
//! this machine, sharing its cores, wrk and curl included.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use e2e::{garage::Garage, make_webm, Cluster, ClusterOpts};

const LIMIT: Duration = Duration::from_secs(600);

fn movie(path: &Path, secs: u32) {
    // Within the site's copy limits (so it is remuxed, not transcoded);
    // noise makes x264 spend the whole bit rate.
    e2e::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        &secs.to_string(),
        "-vf",
        "noise=alls=40:allf=t",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
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
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-movflags",
        "+faststart",
        path.to_str().unwrap(),
    ]);
}

const REPORT_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT bytes=%d usecs=%d reqs=%d p99_us=%d errors=%d\n",
    summary.bytes, summary.duration, summary.requests, latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

const RANGES_LUA: &str = r#"
local len = tonumber(os.getenv("MOVIE_LEN"))
local mib = 1048576
local counter = 0
request = function()
  counter = counter + 1
  local start = ((counter * 7919) % math.floor(len / mib - 1)) * mib
  return wrk.format("GET", nil, { Range = "bytes=" .. start .. "-" .. (start + mib - 1) })
end
"#;

/// One wrk run: MiB/s and p99 ms.
fn wrk(
    dir: &Path,
    url: &str,
    host: Option<&str>,
    conns: u32,
    ranges: bool,
    len: usize,
) -> (f64, f64) {
    let script = dir.join(if ranges { "ranges.lua" } else { "whole.lua" });
    std::fs::write(
        &script,
        format!("{REPORT_LUA}{}", if ranges { RANGES_LUA } else { "" }),
    )
    .unwrap();
    let mut cmd = Command::new("wrk");
    cmd.env("MOVIE_LEN", len.to_string())
        .args([
            "-t",
            "2",
            "-c",
            &conns.to_string(),
            "-d",
            "8s",
            "--timeout",
            "30s",
            "-s",
        ])
        .arg(&script);
    if let Some(h) = host {
        cmd.args(["-H", &format!("Host: {h}")]);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("wrk (scripts/setup bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| panic!("wrk said: {text}"));
    let v = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(v("errors"), 0.0, "wrk saw errors on {url}: {line}");
    let secs = v("usecs") / 1e6;
    (v("bytes") / secs / 1048576.0, v("p99_us") / 1000.0)
}

/// Milliseconds to the first body byte of a 1 MiB range at `at`.
async fn ttfb(client: &reqwest::Client, url: &str, host: Option<&str>, at: usize) -> f64 {
    let started = Instant::now();
    let mut req = client
        .get(url)
        .header("range", format!("bytes={at}-{}", at + 1048575));
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let mut r = req.send().await.unwrap();
    assert_eq!(r.status(), 206, "{url}");
    r.chunk().await.unwrap().expect("a first chunk");
    let t = started.elapsed().as_secs_f64() * 1000.0;
    while r.chunk().await.unwrap().is_some() {}
    t
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A signed call to node `i` as the manager makes it.
fn signed(
    cluster: &Cluster,
    i: usize,
    method: reqwest::Method,
    path: &str,
    content: &str,
) -> reqwest::RequestBuilder {
    let node = &cluster.nodes[i];
    let secret = hex::decode(&node.secret).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let auth = shared::sign_request(&secret, "manager", method.as_str(), path, now, content);
    cluster
        .client()
        .request(method, format!("{}{path}", node.proc.url))
        .header(shared::AUTH_HEADER, auth)
        .header(shared::DATE_HEADER, now.to_string())
}

fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

fn say(line: String) {
    println!("{line}");
}

async fn serve() {
    let garage = Garage::start();
    garage.create_bucket("toronto-blobs");
    garage.create_bucket("plain");
    garage.cli(0, &["bucket", "website", "--allow", "plain"]);
    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.reconcile_interval_secs = 3600;
    opts.node_tables = vec![String::new(), garage.storage_toml(0, "toronto-blobs")];
    let cluster = Cluster::start_with(&opts);
    let dir = cluster.dir.path().to_path_buf();
    let src = dir.join("movie.mp4");
    eprintln!("making a 120 s movie at 7 Mbit/s");
    movie(&src, 120);
    let id = cluster.publish(&src, "bench", LIMIT).await;
    let asset = cluster.asset(&id).await;
    let media_url = asset["media_url"].as_str().unwrap().to_string();
    let node_url = cluster
        .redirect_location(&format!("{media_url}?node=toronto"))
        .await;
    let client = cluster.client();
    let plain = client
        .get(&node_url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let len = plain.len();
    let plain_path = dir.join("plain.mp4");
    std::fs::write(&plain_path, &plain).unwrap();
    let s3 = garage.client(0, "plain");
    object_store::ObjectStore::put(
        &*s3,
        &object_store::path::Path::from("movie.mp4"),
        object_store::PutPayload::from(plain.clone()),
    )
    .await
    .unwrap();
    let web = format!("http://127.0.0.1:{}/movie.mp4", garage.web_port(0));
    let host = "plain.web.garage.localhost";
    let direct = client
        .get(&web)
        .header("host", host)
        .header("range", "bytes=1000000-1999999")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        direct[..] == plain[1000000..2000000],
        "Garage's website serves other bytes"
    );
    say(format!(
        "movie: {len} bytes ({} MiB), toronto's copy in Garage, utah's on disk",
        len >> 20
    ));

    say("== node on Garage vs wrk on Garage's website endpoint, plaintext (MiB/s; p99 ms)".into());
    for ranges in [false, true] {
        for conns in [16, 64] {
            let (node, node_p99) = wrk(&dir, &node_url, None, conns, ranges, len);
            let (g, g_p99) = wrk(&dir, &web, Some(host), conns, ranges, len);
            say(format!(
                "{:6} {conns:2} conns: node {node:7.1} (p99 {node_p99:6.1})  garage {g:7.1} (p99 {g_p99:6.1})  = {:.2}x",
                if ranges { "ranges" } else { "whole" },
                node / g
            ));
        }
    }

    say("== time to first byte, 1 MiB range from the middle, median of 50 (alternating)".into());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        a.push(ttfb(&client, &node_url, None, len / 2).await);
        b.push(ttfb(&client, &web, Some(host), len / 2).await);
    }
    let (a, b) = (median(a), median(b));
    say(format!(
        "ttfb: node {a:.2} ms, garage {b:.2} ms = {:.2}x",
        a / b
    ));

    say("== push and refill into the Garage node vs curl -T to Garage (MiB/s, best of 3)".into());
    let inv = cluster.node_inventory(1).await;
    let blob = inv["blobs"][0]["blob"].as_str().unwrap().to_string();
    let sealed_path = e2e::files_under(&cluster.nodes[0].storage.join("blobs"))
        .into_iter()
        .find(|p| p.ends_with(&blob))
        .unwrap();
    let sealed = bytes::Bytes::from(std::fs::read(&sealed_path).unwrap());
    let toronto = garage.client(0, "toronto-blobs");
    let key = object_store::path::Path::from(format!("blobs/{blob}"));
    let path = format!("/internal/v1/blobs/{blob}");
    let mib = sealed.len() as f64 / 1048576.0;
    let (mut push, mut refill, mut curl) = (0f64, 0f64, 0f64);
    for round in 0..3 {
        object_store::ObjectStore::delete(&*toronto, &key)
            .await
            .unwrap();
        let started = Instant::now();
        let r = signed(&cluster, 1, reqwest::Method::PUT, &path, &blob)
            .body(sealed.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        push = push.max(mib / started.elapsed().as_secs_f64());

        object_store::ObjectStore::delete(&*toronto, &key)
            .await
            .unwrap();
        let started = Instant::now();
        let source = signed(
            &cluster,
            0,
            reqwest::Method::GET,
            &path,
            &shared::content_sha256_hex(b""),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(source.status(), 200);
        let r = signed(&cluster, 1, reqwest::Method::PUT, &path, &blob)
            .body(reqwest::Body::wrap_stream(source.bytes_stream()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        refill = refill.max(mib / started.elapsed().as_secs_f64());

        let started = Instant::now();
        let ok = Command::new("curl")
            .args(["-fsS", "-o", "/dev/null", "-T"])
            .arg(&sealed_path)
            .args([
                "--aws-sigv4",
                "aws:amz:garage:s3",
                "--user",
                &format!("{}:{}", garage.key_id, garage.secret),
                "-H",
                "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            ])
            .arg(format!("{}/plain/copy-{round}", garage.endpoint(0)))
            .status()
            .unwrap()
            .success();
        assert!(ok, "curl PUT to Garage failed");
        curl = curl.max(mib / started.elapsed().as_secs_f64());
    }
    say(format!(
        "push {push:.1} MiB/s, refill {refill:.1} MiB/s, curl -T to Garage {curl:.1} MiB/s: push {:.2}x, refill {:.2}x",
        push / curl,
        refill / curl
    ));
    say(format!(
        "toronto (Garage-backed) node peak RSS: {} MiB over the whole run",
        peak_rss_mib(cluster.nodes[1].proc.pid())
    ));
}

async fn cluster_drill() {
    let mut garage = Garage::start_cluster(3);
    garage.create_bucket("toronto-blobs");
    let mut opts = ClusterOpts::new(&["utah", "toronto"]);
    opts.fixed_ports = true;
    opts.reconcile_interval_secs = 5;
    opts.scrub_rate_mb_per_sec = 50.0;
    opts.scrub_interval_secs = 2;
    // The node talks to Garage process 0; process 2 is the one killed.
    opts.node_tables = vec![String::new(), garage.storage_toml(0, "toronto-blobs")];
    let cluster = Cluster::start_with(&opts);
    let client = cluster.client();
    let input = cluster.dir.path().join("one.webm");
    make_webm(&input);
    let first = cluster.publish(&input, "before", LIMIT).await;
    say("published one movie on utah and on toronto (3 Garage processes, rf 3)".into());

    garage.kill(2);
    let t = Instant::now();
    let second_input = cluster.dir.path().join("two.webm");
    make_webm(&second_input);
    let second = cluster.publish(&second_input, "while down", LIMIT).await;
    say(format!(
        "Garage process 2 killed; a second movie published (pushed to toronto) in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    for id in [&first, &second] {
        let asset = cluster.asset(id).await;
        let url = format!("{}?node=toronto", asset["media_url"].as_str().unwrap());
        let whole = client.get(&url).send().await.unwrap();
        assert_eq!(whole.status(), 200);
        let whole = whole.bytes().await.unwrap();
        let part = client
            .get(&url)
            .header("range", "bytes=1000-99999")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(part[..] == whole[1000..100000], "ranges agree");
    }
    let health = client
        .get(format!("{}/healthz", cluster.nodes[1].proc.url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(
        health, 200,
        "toronto stays healthy with one Garage process down"
    );
    say("both movies play from toronto, whole and in ranges; toronto healthy".into());

    garage.restart(2);
    let inv = cluster.node_inventory(1).await;
    let from = inv["scrub"]["passes_completed"].as_u64().unwrap();
    let started = Instant::now();
    let inv = loop {
        let inv = cluster.node_inventory(1).await;
        if inv["scrub"]["passes_completed"].as_u64().unwrap() >= from + 2 {
            break inv;
        }
        assert!(started.elapsed() < LIMIT, "no scrub pass: {inv}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(inv["counts"]["good"], 2, "{inv}");
    assert_eq!(inv["counts"]["quarantined"], 0, "{inv}");
    let metrics = cluster.metrics(&cluster.nodes[1].proc.url).await;
    assert!(
        metrics.contains("viewnode_scrub_mismatches_total 0")
            || !metrics.contains("viewnode_scrub_mismatches_total"),
        "{metrics}"
    );
    say(format!(
        "process 2 back; a whole scrub pass over toronto's bucket: {} good, {} quarantined, no mismatch",
        inv["counts"]["good"], inv["counts"]["quarantined"]
    ));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("serve") => serve().await,
        Some("cluster") => cluster_drill().await,
        _ => {
            eprintln!("usage: garage serve|cluster");
            std::process::exit(2);
        }
    }
}
