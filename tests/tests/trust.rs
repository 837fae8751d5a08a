//! Trust and money drills (docs/credits.md), with real processes: a log-in
//! flood runs only as many password hashes as the limit allows; a price
//! set on a free movie stops its old media URLs at the manager and at the
//! nodes; a paid view whose client reads a little and then stalls is never
//! refunded; 600 views journalled while the manager is down, delivered
//! slowly, are never refunded; a node whose journal disk is full holds
//! every refund and says so.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use e2e::{
    error_code as code, ffmpeg, make_webm, metric_sum as metric, no_redirects, status_json as json,
    Cluster, ClusterOpts,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(240);

/// An account made with the manager's CLI, and its API token.
fn account(cluster: &Cluster, email: &str) -> String {
    cluster.manager_cli(&["create-user", "--email", email, "--generate-password"]);
    cluster.manager_cli(&["create-token", "--email", email])
}

async fn get_as(cluster: &Cluster, token: &str, path: &str) -> serde_json::Value {
    let (s, v) = cluster.get_as(token, path).await;
    assert_eq!(s, 200, "{path}: {v}");
    v
}

async fn purchase(cluster: &Cluster, token: &str, asset: &str, request: &str) -> serde_json::Value {
    let (s, v) = cluster.purchase(token, asset, request).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// The first KiB of `url`, as a player's first request asks for it (no
/// redirects followed).
async fn first_kib(url: &str) -> reqwest::Response {
    no_redirects()
        .get(url)
        .header("range", "bytes=0-1023")
        .send()
        .await
        .unwrap()
}

/// The node URL a manager media URL `{m}/media/{token}/{asset}.mp4` leads
/// to on node `url`, built without asking the manager (it may be down).
fn node_url(node: &str, media_url: &str) -> String {
    let (_, rest) = media_url.split_once("/media/").unwrap();
    format!("{node}/play/{rest}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_flood_runs_at_most_the_limit_of_hashes() {
    let mut o = ClusterOpts::new(&["utah"]);
    o.min_replicas = 1;
    let cluster = Cluster::start_with(&o);
    let m = cluster.manager.url.clone();
    let c = no_redirects();
    let (csrf_cookie, csrf) = e2e::login_csrf(&m, "/login").await;
    let before = metric(&cluster.metrics(&m).await, "manager_password_checks_total");
    let attempts = (0..200).map(|i| {
        let (c, m, cookie, csrf) = (c.clone(), m.clone(), csrf_cookie.clone(), csrf.clone());
        let email = cluster.operator_email.clone();
        async move {
            c.post(format!("{m}/login"))
                .header("cookie", cookie)
                .form(&[
                    ("csrf", csrf.as_str()),
                    ("email", &email),
                    ("password", &format!("wrong guess {i}")),
                ])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures_join_all(attempts).await;
    let after = metric(&cluster.metrics(&m).await, "manager_password_checks_total");
    let wrong = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(wrong + limited, 200, "{statuses:?}");
    assert!(wrong <= 10, "{wrong} guesses checked");
    assert!(
        after - before <= 10.0,
        "{} password hashes ran for 200 guesses",
        after - before
    );
    // The account is locked for the window, even with the right password.
    let r = c
        .post(format!("{m}/login"))
        .header("cookie", &csrf_cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("email", &cluster.operator_email),
            ("password", &cluster.operator_password),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // A megabyte of e-mail is refused before anything is stored or hashed.
    let huge = format!("{}@example.com", "a".repeat(1 << 20));
    let r = c
        .post(format!("{m}/login"))
        .header("cookie", &csrf_cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("email", huge.as_str()),
            ("password", "whatever"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let after_huge = metric(&cluster.metrics(&m).await, "manager_password_checks_total");
    assert_eq!(after_huge, after, "no hash for a refused e-mail");
}

/// `futures::future::join_all` without the dependency: spawn and await.
async fn futures_join_all<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A 20-second H.264/AAC MP4 at ~7 Mbit/s (noise does not compress), big
/// enough that a client which stops reading leaves most of it unsent. It
/// fits the copy profile, so the manager remuxes it without re-encoding.
fn make_big_mp4(path: &std::path::Path) {
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=640x360:rate=25,noise=alls=100:allf=t+u",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=48000",
        "-t",
        "20",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-g",
        "50",
        "-b:v",
        "7M",
        "-maxrate",
        "7M",
        "-bufsize",
        "2M",
        "-c:a",
        "aac",
        "-movflags",
        "+faststart",
        path.to_str().unwrap(),
    ]);
}

/// Two nodes that deliver their journal every second and poll prices every
/// second; grants of 60 s with 30 s of grace (the shortest allowed), swept
/// every second.
fn refund_drill_opts() -> ClusterOpts {
    let mut o = ClusterOpts::new(&["utah", "toronto"]);
    o.fixed_ports = true;
    o.node_extra = "price_poll_secs = 1\njournal_flush_secs = 1\njournal_forward_secs = 1\n".into();
    o.manager_extra =
        "[credits]\ngrant_window_secs = 60\nrefund_grace_secs = 30\nsweep_interval_secs = 1\n"
            .into();
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_price_stops_old_free_urls_and_a_stalled_paid_view_is_never_refunded() {
    let cluster = Cluster::start_with(&refund_drill_opts());
    let input = cluster.dir.path().join("big.mp4");
    make_big_mp4(&input);
    let asset = cluster.publish(&input, "Noise", LIMIT).await;
    let viewer = account(&cluster, "viewer@example.com");

    // Free: a viewer's media URL plays, at the manager and at the node.
    let free_url = get_as(&cluster, &viewer, &format!("/api/v1/assets/{asset}")).await["media_url"]
        .as_str()
        .unwrap()
        .to_string();
    let at_node = cluster.redirect_location(&free_url).await;
    assert_eq!(first_kib(&at_node).await.status(), 206);

    // The owner sets a price: the old free URL is refused by the manager
    // at once, for GET and HEAD, and by the node within its poll.
    cluster.set_price(&asset, 5).await;
    let r = no_redirects().get(&free_url).send().await.unwrap();
    let (s, v) = json(r).await;
    assert_eq!((s, code(&v)), (402, Some("payment_required")), "{v}");
    let r = no_redirects().head(&free_url).send().await.unwrap();
    assert_eq!(r.status(), 402);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = first_kib(&at_node).await;
        if r.status() == 402 {
            let (_, v) = json(r).await;
            assert_eq!(code(&v), Some("payment_required"), "{v}");
            break;
        }
        assert_eq!(r.status(), 206);
        assert!(
            Instant::now() < deadline,
            "the node still plays a stale free URL\n{}",
            cluster.nodes[0].proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The owner still plays their own movie with a fresh URL.
    let own = cluster.asset(&asset).await["media_url"]
        .as_str()
        .unwrap()
        .to_string();
    let own_node = cluster.redirect_location(&own).await;
    assert_eq!(first_kib(&own_node).await.status(), 206);

    // A paid view whose client reads 1 MiB, then stalls with the socket
    // open until well past the grant's window and grace.
    cluster.grant_credits("viewer@example.com", 100, "test");
    let bought = purchase(&cluster, &viewer, &asset, "stall-1").await;
    let grant = bought["grant_id"].as_str().unwrap().to_string();
    let expires = bought["expires_at"].as_i64().unwrap();
    let loc = cluster
        .redirect_location(bought["media_url"].as_str().unwrap())
        .await;
    let url = reqwest::Url::parse(&loc).unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    // A small window, so the stall is felt at once by the node.
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    let mut conn = sock
        .connect(
            format!("127.0.0.1:{}", url.port().unwrap())
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    conn.write_all(
        format!(
            "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            &loc[loc.find("/play/").unwrap()..]
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut read = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while read < 1 << 20 {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "the node closed after {read} bytes");
        read += n;
    }
    // Stalled: past expiry + grace + a few sweeps, the grant stands.
    while shared::runtime::unix_now() < expires + 30 + 8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let g = get_as(&cluster, &viewer, &format!("/api/v1/grants/{grant}")).await;
    assert_eq!(g["state"], "active", "a watched view was refunded: {g}");
    assert!(
        g["bytes_served"].as_i64().unwrap() >= (1 << 20) - 4096,
        "what the client read is journalled: {g}"
    );
    drop(conn);
}

/// Forwards loopback TCP to `to`, holding every chunk from the client for
/// `delay` first: a slow path between a node and the manager.
async fn slow_proxy(to: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        tokio::time::sleep(delay).await;
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn views_journalled_while_the_manager_is_down_or_on_a_full_disk_are_never_refunded() {
    let mut cluster = Cluster::start_with(&refund_drill_opts());
    let m = cluster.manager.url.clone();
    let manager_port = reqwest::Url::parse(&m).unwrap().port().unwrap();
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let asset = cluster.publish(&input, "Paid", LIMIT).await;
    cluster.set_price(&asset, 1).await;
    let buyer = cluster.buyer("buyer@example.com", 1000);

    // Utah reaches the manager through a path that holds every request
    // 2 s, so its 600 events arrive in two batches far apart.
    let proxy = slow_proxy(manager_port, Duration::from_secs(2)).await;
    cluster.nodes[0].proc.stop();
    let cfg = std::fs::read_to_string(&cluster.nodes[0].config).unwrap();
    let cfg = cfg.replace(
        &format!("manager_url = \"http://127.0.0.1:{manager_port}\""),
        &format!("manager_url = \"http://127.0.0.1:{proxy}\""),
    );
    std::fs::write(&cluster.nodes[0].config, cfg).unwrap();
    cluster.restart_node(0);
    let utah = cluster.nodes[0].proc.url.clone();

    // 600 paid views bought, then played at utah while the manager is down.
    let mut urls = Vec::new();
    for i in 0..600 {
        let p = purchase(&cluster, &buyer, &asset, &format!("down-{i}")).await;
        urls.push(node_url(&utah, p["media_url"].as_str().unwrap()));
    }
    let last_expiry = shared::runtime::unix_now() + 60;
    let balance = get_as(&cluster, &buyer, "/api/v1/account").await["balance"]
        .as_i64()
        .unwrap();
    assert_eq!(balance, 400);
    assert!(cluster.manager.stop());
    let c = no_redirects();
    for u in &urls {
        let r = first_kib(u).await;
        assert_eq!(r.status(), 206);
        r.bytes().await.unwrap();
    }
    // Back after every grant expired (plus grace): the sweep finds them all
    // unplayed in its books until utah's journal arrives.
    while shared::runtime::unix_now() < last_expiry + 31 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    cluster.restart_manager();
    let deadline = Instant::now() + LIMIT;
    loop {
        let text = cluster.metrics(&m).await;
        let lowest = text
            .lines()
            .filter(|l| l.starts_with("manager_node_watermark_seconds{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(f64::MAX, f64::min);
        if metric(&text, "manager_view_events_total") >= 600.0
            && lowest > (last_expiry + 30 + 2) as f64
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the journal did not arrive\n{}",
            cluster.nodes[0].proc.log_text()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acct = get_as(&cluster, &buyer, "/api/v1/account").await;
    assert_eq!(acct["balance"], 400, "watched views were refunded");
    assert!(
        !acct["ledger"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "refund"),
        "{acct}"
    );

    // Toronto's journal on a full filesystem: the view it serves cannot be
    // written, so no refund may pass, and it says so.
    let journal = cluster.nodes[1].storage.join("journal");
    cluster.nodes[1].proc.stop();
    std::fs::rename(&journal, cluster.nodes[1].storage.join("journal.before")).unwrap();
    std::fs::create_dir(&journal).unwrap();
    let _mount = e2e::Tmpfs::mount(&journal, "64k");
    // One event may wait in memory for the disk; past that, paid views are
    // refused rather than served unrecorded.
    let cfg = std::fs::read_to_string(&cluster.nodes[1].config).unwrap();
    std::fs::write(
        &cluster.nodes[1].config,
        format!("journal_max_unwritten = 1\n{cfg}"),
    )
    .unwrap();
    cluster.restart_node(1);
    let toronto = cluster.nodes[1].proc.url.clone();
    let filler = journal.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).and_then(|_| f.sync_all()).is_ok() {}
    }
    let p = purchase(&cluster, &buyer, &asset, "full-disk").await;
    let grant = p["grant_id"].as_str().unwrap().to_string();
    let expires = p["expires_at"].as_i64().unwrap();
    let r = first_kib(&node_url(&toronto, p["media_url"].as_str().unwrap())).await;
    assert_eq!(r.status(), 206);
    r.bytes().await.unwrap();
    // The journal holds its one event in memory: the next paid view is
    // refused with its code, and health says why, so the manager sends
    // viewers elsewhere.
    let refused = purchase(&cluster, &buyer, &asset, "full-disk-refused").await;
    let refused_url = node_url(&toronto, refused["media_url"].as_str().unwrap());
    let r = first_kib(&refused_url).await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "journal_full", "{body}");
    let h = c.get(format!("{toronto}/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 503);
    let h: serde_json::Value = h.json().await.unwrap();
    assert_eq!(h["journal"], "full", "{h}");
    assert!(h["journal_unwritten"].as_u64() >= Some(1), "{h}");
    while shared::runtime::unix_now() < expires + 30 + 6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let g = get_as(&cluster, &buyer, &format!("/api/v1/grants/{grant}")).await;
    assert_eq!(
        g["state"], "active",
        "refunded with its view unwritten: {g}"
    );
    let log = cluster.nodes[1].proc.log_text();
    assert!(log.contains("journal_write_failed"), "{log}");
    let text = cluster.metrics(&toronto).await;
    assert!(
        metric(&text, "viewnode_journal_write_errors_total") > 0.0,
        "{text}"
    );
    // Space again: the view is written and delivered.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let g = get_as(&cluster, &buyer, &format!("/api/v1/grants/{grant}")).await;
        if g["bytes_served"].as_i64().unwrap() > 0 {
            assert_eq!(g["state"], "active", "{g}");
            break;
        }
        assert!(Instant::now() < deadline, "{g}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // And paid views play there again (a new one: the refused grant has
    // expired meanwhile).
    let again = purchase(&cluster, &buyer, &asset, "full-disk-freed").await;
    let r = first_kib(&node_url(&toronto, again["media_url"].as_str().unwrap())).await;
    assert_eq!(r.status(), 206);
    r.bytes().await.unwrap();
    assert!(
        cluster.nodes[1].proc.log_text().contains("journal_full"),
        "the refusal is logged with its code"
    );
    cluster.nodes[1].proc.stop();
}
