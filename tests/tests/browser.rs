//! A person's path in a real browser: log in, upload through the web form
//! (with its progress bar), wait on the movie page, and play the movie in
//! the page's `<video>` through the media URL. Debian's chromium and
//! chromedriver are installed by scripts/test; their absence fails the test.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use e2e::{free_port, make_webm, Cluster};
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_chromedriver() -> (Driver, String) {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian package chromium-driver) is installed by scripts/test");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{url}/status")).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (Driver(child), url)
}

/// A headless Chromium session through chromedriver, with its own profile.
async fn chromium(profile: &std::path::Path, driver_url: &str) -> fantoccini::Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--autoplay-policy=no-user-gesture-required",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    // chromedriver is on loopback: plain HTTP, no TLS stack needed.
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(driver_url)
        .await
        .expect("connect to chromedriver")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_movie_uploaded_through_the_web_form_plays_in_chromium() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("garden.webm");
    make_webm(&input);
    let profile = cluster.dir.path().join("chromium-profile");
    let (_driver, driver_url) = start_chromedriver().await;

    let c = chromium(&profile, &driver_url).await;
    let base = &cluster.manager.url;

    log_in(
        &c,
        base,
        &cluster.operator_email,
        &cluster.operator_password,
    )
    .await;
    let body = c
        .find(Locator::Css("header"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains(&cluster.operator_email),
        "not logged in: {body}"
    );

    // Upload through the web form.
    c.goto(&format!("{base}/upload")).await.unwrap();
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("input[name=title]"))
        .await
        .unwrap();
    send_through_page(&c, "Garden", &input).await;

    // The script sends us to the movie page, which refreshes until published.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let url = c.current_url().await.unwrap();
        if url.path().starts_with("/assets/") && c.find(Locator::Id("player")).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "movie never published; at {url}\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Play it and watch the clock move.
    let state = plays(&c).await;
    assert_eq!(
        (state["w"].as_u64(), state["h"].as_u64()),
        (Some(640), Some(360)),
        "{state}"
    );
    assert!((state["d"].as_f64().unwrap() - 5.0).abs() < 0.5, "{state}");

    // Keep a picture of the page for whoever reads the test output.
    let shot = c.screenshot().await.unwrap();
    assert!(shot.starts_with(b"\x89PNG"));
    let out = e2e::bin_dir().join("watch-page.png");
    std::fs::write(&out, shot).unwrap();
    eprintln!("screenshot of the watch page: {}", out.display());

    // Register an in-world terminal for this movie on the web site.
    let asset_id = c
        .current_url()
        .await
        .unwrap()
        .path()
        .trim_start_matches("/assets/")
        .to_string();
    c.goto(&format!("{base}/terminals")).await.unwrap();
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("input[name=name]"))
        .await
        .unwrap();
    c.find(Locator::Css("input[name=name]"))
        .await
        .unwrap()
        .send_keys("Lobby screen")
        .await
        .unwrap();
    c.find(Locator::Css("main form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let terminal_id = c
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Id("terminal-id"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let secret = c
        .find(Locator::Id("terminal-secret"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let script = c
        .find(Locator::Id("script"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        script.contains(&secret) && script.contains(&terminal_id) && script.contains(&asset_id)
    );
    assert!(script.contains("llHMAC(TERMINAL_SECRET, body, \"sha256\")"));
    c.close().await.unwrap();
    terminal_requests(&cluster, &terminal_id, &secret, &asset_id).await;
}

fn llhmac(secret: &str, body: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// What the LSL script sends, signed as `llHMAC` signs, and the ways a
/// forger or a replaying eavesdropper gets refused.
async fn terminal_requests(cluster: &Cluster, terminal: &str, secret: &str, asset: &str) {
    let url = format!("{}/api/v1/terminal/play", cluster.manager.url);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let body = |ts: u64, nonce: &str| {
        format!("terminal={terminal}&asset={asset}&avatar=3c0ffee0-0000-4000-8000-000000000001&ts={ts}&nonce={nonce}")
    };
    let send = |body: String, sig: String| {
        let client = cluster.client();
        let url = url.clone();
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-terminal-signature", sig)
                // Forgeable headers change nothing.
                .header(
                    "x-secondlife-owner-key",
                    "00000000-0000-0000-0000-000000000000",
                )
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let good = body(now, "nonce-1");
    let (status, v) = send(good.clone(), llhmac(secret, &good)).await;
    assert_eq!(status, 200, "{v}");
    // `/media/{token}/{asset}.mp4`: a signed URL for this movie.
    let url = v["media_url"].as_str().unwrap();
    assert!(
        url.contains("/media/") && url.ends_with(&format!("/{asset}.mp4")),
        "{v}"
    );

    let (status, v) = send(good.clone(), llhmac(secret, &good)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("terminal_replayed")),
        "{v}"
    );

    let other = body(now, "nonce-2");
    let (status, v) = send(other.clone(), llhmac("slt_guessed", &other)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("terminal_bad_signature")),
        "{v}"
    );

    let old = body(now - 3600, "nonce-3");
    let (status, v) = send(old.clone(), llhmac(secret, &old)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("terminal_stale")),
        "{v}"
    );

    let tampered = good.replace("nonce-1", "nonce-4");
    let (status, v) = send(tampered, llhmac(secret, &good)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("terminal_bad_signature")),
        "{v}"
    );

    let unknown = body(now, "nonce-5").replace(terminal, "0000");
    let (status, v) = send(unknown.clone(), llhmac(secret, &unknown)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("terminal_unknown")),
        "{v}"
    );

    let (status, v) = send("garbage".into(), llhmac(secret, "garbage")).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("terminal_bad_request")),
        "{v}"
    );
}

/// Plays the page's `<video id=player>` until its clock passes 1.5 s.
async fn plays(c: &fantoccini::Client) -> serde_json::Value {
    c.execute(
        "const v = document.getElementById('player'); v.muted = true; v.play(); return true;",
        vec![],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c
            .execute(
                "const v = document.getElementById('player');
                 return {t: v.currentTime, err: v.error ? v.error.code : null, w: v.videoWidth, h: v.videoHeight, d: v.duration};",
                vec![],
            )
            .await
            .unwrap();
        assert!(s["err"].is_null(), "media error in the browser: {s}");
        if s["t"].as_f64().unwrap_or(0.0) > 1.5 {
            return s;
        }
        assert!(Instant::now() < deadline, "video did not play: {s}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// On the upload page: types the title, chooses `file`, presses Upload.
async fn send_through_page(c: &fantoccini::Client, title: &str, file: &std::path::Path) {
    fill(c, "input[name=title]", title).await;
    fill(c, "input[name=file]", file.to_str().unwrap()).await;
    c.find(Locator::Id("send"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn fill(c: &fantoccini::Client, css: &str, text: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

async fn text_of(c: &fantoccini::Client, css: &str) -> String {
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|_| panic!("no {css} on the page"))
        .text()
        .await
        .unwrap()
}

/// What the demo shows, in a real browser: a new viewer signs up (and gets
/// the signup bonus), buys a view of a priced movie, watches it, and finds
/// the purchase in their ledger; the uploader finds their share in theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_viewer_signs_up_buys_a_view_watches_it_and_sees_the_ledger_in_chromium() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("paid.webm");
    make_webm(&input);
    let (status, body) = cluster.upload(&input, "Premiere").await.unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["asset_id"].as_str().unwrap().to_string();
    let asset = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(asset["state"], "published", "{asset}");
    let base = &cluster.manager.url;
    let r = cluster
        .client()
        .put(format!("{base}/api/v1/assets/{id}/price"))
        .bearer_auth(&cluster.api_token)
        .json(&json!({ "price": 40 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let (_driver, driver_url) = start_chromedriver().await;
    let c = chromium(&cluster.dir.path().join("viewer-profile"), &driver_url).await;

    // Sign up through the form.
    c.goto(&format!("{base}/signup")).await.unwrap();
    text_of(&c, "input[name=email]").await;
    fill(&c, "input[name=email]", "viewer@example.com").await;
    fill(&c, "input[name=password]", "a long enough password").await;
    c.find(Locator::Css("main form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("header form[action='/logout']"))
        .await
        .expect("signed up and logged in");
    c.goto(&format!("{base}/account")).await.unwrap();
    assert_eq!(text_of(&c, "#balance").await, "1000", "signup bonus");

    // A paid movie's page offers a purchase, not the movie.
    c.goto(&format!("{base}/assets/{id}")).await.unwrap();
    assert_eq!(text_of(&c, "#price").await, "40");
    assert!(
        c.find(Locator::Id("player")).await.is_err(),
        "a paid movie must not play before it is bought"
    );
    c.find(Locator::Css(&format!(
        "form[action='/assets/{id}/buy'] button"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    assert_eq!(text_of(&c, "#balance").await, "960");
    let media_url = text_of(&c, "#media-url").await;
    assert!(media_url.contains(&format!("/{id}.mp4")), "{media_url}");
    let state = plays(&c).await;
    assert_eq!(
        (state["w"].as_u64(), state["h"].as_u64()),
        (Some(640), Some(360)),
        "{state}"
    );

    // The ledger shows the bonus and the purchase, newest first or last.
    c.goto(&format!("{base}/account")).await.unwrap();
    assert_eq!(text_of(&c, "#balance").await, "960");
    let ledger = text_of(&c, "#ledger").await;
    assert!(
        ledger.contains("signup_bonus") && ledger.contains("1000"),
        "{ledger}"
    );
    assert!(
        ledger.contains("purchase") && ledger.contains("-40"),
        "{ledger}"
    );
    let shot = c.screenshot().await.unwrap();
    let out = e2e::bin_dir().join("account-page.png");
    std::fs::write(&out, shot).unwrap();
    eprintln!("screenshot of the account page: {}", out.display());
    c.close().await.unwrap();

    // The uploader's share (70% by default) is in the operator's ledger.
    let r = cluster
        .client()
        .get(format!("{base}/api/v1/account"))
        .bearer_auth(&cluster.api_token)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v.to_string().contains("\"sale\""), "{v}");
}

/// Logs `c` in through the form as `email`, and waits for the next page,
/// not the one being left: only a logged-in page has the log-out form.
async fn log_in(c: &fantoccini::Client, base: &str, email: &str, password: &str) {
    c.goto(&format!("{base}/login")).await.unwrap();
    text_of(c, "input[name=email]").await;
    fill(c, "input[name=email]", email).await;
    fill(c, "input[name=password]", password).await;
    c.find(Locator::Css("main form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("header form[action='/logout']"))
        .await
        .expect("logged in");
}

/// Clicks the button of the form posting to `action`, and waits for the
/// page it answers with (every admin action answers with its `#message`).
/// The page being left is marked first, so its own `#message` (from the
/// previous action) is never taken for the answer.
async fn submit(c: &fantoccini::Client, action: &str) -> String {
    c.execute("document.documentElement.dataset.left = '1'", vec![])
        .await
        .unwrap();
    c.find(Locator::Css(&format!("form[action='{action}'] button")))
        .await
        .unwrap_or_else(|_| panic!("a form posting to {action}"))
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("html:not([data-left]) #message"))
        .await
        .unwrap_or_else(|_| panic!("the answer to {action}"))
        .text()
        .await
        .unwrap()
}

/// Writes a screenshot of the current page next to the binaries.
async fn screenshot(c: &fantoccini::Client, name: &str) {
    let shot = c.screenshot().await.unwrap();
    assert!(
        shot.starts_with(b"\x89PNG") && shot.len() > 10_000,
        "{name}: a real picture"
    );
    let out = e2e::bin_dir().join(name);
    std::fs::write(&out, shot).unwrap();
    eprintln!("screenshot: {}", out.display());
}

async fn attr(c: &fantoccini::Client, css: &str, name: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|_| panic!("no {css} on the page"))
        .attr(name)
        .await
        .unwrap()
        .unwrap_or_default()
}

/// The operator's night, in a real browser: the overview, a node drained
/// and brought back, credits granted by rule, an incident written; the
/// public status page shows it. A screenshot of each page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_site_from_the_admin_in_chromium() {
    let mut o = e2e::ClusterOpts::new(&["utah", "toronto"]);
    o.manager_extra = "[monitor]\ninterval_secs = 5\nlow_disk_percent = 1\n".into();
    let cluster = Cluster::start_with(&o);
    let base = &cluster.manager.url;
    let (_driver, driver_url) = start_chromedriver().await;
    let c = chromium(&cluster.dir.path().join("operator-profile"), &driver_url).await;
    log_in(
        &c,
        base,
        &cluster.operator_email,
        &cluster.operator_password,
    )
    .await;

    c.goto(&format!("{base}/admin")).await.unwrap();
    assert!(text_of(&c, "h1").await.contains("Is everything fine?"));
    text_of(&c, "[data-node='utah']").await;
    screenshot(&c, "admin-overview.png").await;

    // Drain utah, then bring it back.
    c.goto(&format!("{base}/admin/nodes")).await.unwrap();
    let m = submit(&c, "/admin/nodes/utah/drain").await;
    assert!(m.contains("utah is drained"), "{m}");
    assert_eq!(
        attr(&c, "section[data-node='utah']", "data-drained").await,
        "true"
    );
    screenshot(&c, "admin-nodes.png").await;
    let m = submit(&c, "/admin/nodes/utah/return").await;
    assert!(m.contains("back in rotation"), "{m}");
    assert_eq!(
        attr(&c, "section[data-node='utah']", "data-drained").await,
        "false"
    );

    // Compensation after an outage: everyone with an account before tomorrow.
    c.goto(&format!("{base}/admin/accounts")).await.unwrap();
    let tomorrow = {
        let t = std::time::SystemTime::now() + Duration::from_secs(86_400);
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let days = secs / 86_400;
        // Civil date from days since 1970 (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let mo = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(mo <= 2);
        format!("{y:04}-{mo:02}-{d:02}")
    };
    fill(&c, "input[name=created_before]", &tomorrow).await;
    fill(&c, "input[name=amount]", "25").await;
    fill(&c, "input[name=reason]", "sorry for the outage").await;
    let m = submit(&c, "/admin/accounts/grant").await;
    assert!(m.contains("25 credits granted to 1 account(s)"), "{m}");

    // An incident on utah's playback, written in the admin.
    c.goto(&format!("{base}/admin/incidents")).await.unwrap();
    fill(&c, "input[name=title]", "Utah playback stalls").await;
    c.find(Locator::Css("select[name=impact] option[value=major]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Css("input[name=component][value='playback:utah']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    fill(
        &c,
        "#new-incident textarea[name=body]",
        "We are looking into it.",
    )
    .await;
    let m = submit(&c, "/admin/incidents").await;
    assert!(m.contains("is on the status page"), "{m}");
    screenshot(&c, "admin-incidents.png").await;

    // What users see.
    c.goto(&format!("{base}/status")).await.unwrap();
    assert_eq!(attr(&c, "#overall", "data-state").await, "down");
    assert_eq!(
        attr(&c, "[data-component='playback:utah']", "data-state").await,
        "down"
    );
    assert!(text_of(&c, ".incident h2")
        .await
        .contains("Utah playback stalls"));
    assert_eq!(
        c.find_all(Locator::Css("[data-component='web'] .bars span"))
            .await
            .unwrap()
            .len(),
        90,
        "90 daily bars"
    );
    screenshot(&c, "status-page.png").await;

    // The account the grant reached, its ledger with the grant.
    c.goto(&format!("{base}/admin/accounts")).await.unwrap();
    c.find(Locator::Css("#accounts a[href^='/admin/accounts/']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("#ledger"))
        .await
        .unwrap();
    assert!(text_of(&c, "#ledger")
        .await
        .contains("sorry for the outage"));
    screenshot(&c, "admin-account.png").await;

    // Movies: the search form (this site has none yet).
    c.goto(&format!("{base}/admin/movies?q=nothing"))
        .await
        .unwrap();
    assert!(text_of(&c, "main").await.contains("No movie matches"));
    text_of(&c, "#find").await;
    screenshot(&c, "admin-movies.png").await;

    // A backup taken from the admin, followed on the page.
    c.goto(&format!("{base}/admin/backups")).await.unwrap();
    let m = submit(&c, "/admin/backups/now").await;
    assert!(m.contains("A backup started"), "{m}");
    let mut done = String::new();
    for _ in 0..60 {
        c.goto(&format!("{base}/admin/backups")).await.unwrap();
        done = attr(&c, "#task", "data-done").await;
        if done == "true" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(done, "true", "the backup finished");
    let task = text_of(&c, "#task").await;
    assert!(task.contains("taken and verified"), "{task}");
    assert!(text_of(&c, "#restore")
        .await
        .contains("manager backup restore"));
    screenshot(&c, "admin-backups.png").await;

    // Each action is in the audit log.
    c.goto(&format!("{base}/admin/audit")).await.unwrap();
    let log = text_of(&c, "main").await;
    for action in [
        "node_drain",
        "node_return",
        "grant_credits",
        "incident_open",
        "backup_now",
    ] {
        assert!(log.contains(action), "{action} in {log}");
    }
}

/// A loopback TCP proxy between the browser and the manager: counts the
/// bytes the browser sends, paces them (a home connection, so there is
/// time to cut), and can cut every connection at once, as a dropped line
/// or a restarted router would. Its target can move (a restarted manager
/// listens on a new port).
struct CutProxy {
    url: String,
    target: std::sync::Arc<std::sync::Mutex<String>>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    async fn start(target: &str, bytes_per_sec: u64) -> CutProxy {
        use std::sync::{atomic::Ordering, Arc, Mutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = Arc::new(Mutex::new(target.trim_start_matches("http://").to_string()));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let (t, s, cs) = (target.clone(), sent.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let addr = t.lock().unwrap().clone();
                let sent = s.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(addr).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            sent.fetch_add(n as u64, Ordering::Relaxed);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_secs_f64(
                                n as f64 / bytes_per_sec as f64,
                            ))
                            .await;
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
                cs.lock().unwrap().push(task.abort_handle());
            }
        });
        CutProxy {
            url,
            target,
            sent,
            conns,
            accept,
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops every connection through the proxy (both ends see a reset).
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn retarget(&self, target: &str) {
        *self.target.lock().unwrap() = target.trim_start_matches("http://").to_string();
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The bytes an unfinished resumable upload holds on the manager's disk.
fn tus_received(cluster: &Cluster) -> Option<u64> {
    let dir = cluster.manager_data.join("staging").join("tus");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".bin"))
        .and_then(|e| e.metadata().ok())
        .map(|m| m.len())
}

/// Waits until the browser has sent `bytes` through the proxy, reading the
/// page's progress line meanwhile; returns the last line seen.
async fn wait_sent(c: &fantoccini::Client, proxy: &CutProxy, bytes: u64, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut line = String::new();
    while proxy.sent() < bytes {
        assert!(
            Instant::now() < deadline,
            "{what}: only {} of {bytes} bytes sent; page says {line:?}",
            proxy.sent()
        );
        if let Ok(e) = c.find(Locator::Id("status")).await {
            line = e.text().await.unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_upload_survives_a_cut_connection_and_a_manager_restart_in_chromium() {
    let mut cluster = Cluster::start(&["utah", "toronto"]);
    // 5 s of lossless 720p noise: about 210 MB that is a real movie.
    let input = cluster.dir.path().join("big.mkv");
    e2e::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=c=gray:s=1280x720:r=25",
        "-vf",
        "noise=alls=100:allf=t+u",
        "-t",
        "5",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-qp",
        "0",
        "-pix_fmt",
        "yuv420p",
        input.to_str().unwrap(),
    ]);
    let size = std::fs::metadata(&input).unwrap().len();
    assert!(size > 200_000_000, "{size}");
    // 40 MB/s: about five seconds a side of each event.
    let proxy = CutProxy::start(&cluster.manager.url, 40 << 20).await;
    let profile = cluster.dir.path().join("chromium-profile-tus");
    let (_driver, driver_url) = start_chromedriver().await;
    let c = chromium(&profile, &driver_url).await;
    let base = proxy.url.clone();
    log_in(
        &c,
        &base,
        &cluster.operator_email,
        &cluster.operator_password,
    )
    .await;
    c.goto(&format!("{base}/upload")).await.unwrap();
    let before = proxy.sent();
    send_through_page(&c, "Big noise", &input).await;

    // Halfway, every connection is cut.
    let line = wait_sent(&c, &proxy, before + size / 2, "before the cut").await;
    assert!(
        line.contains("MiB/s") && line.contains("left") && line.contains('%'),
        "the page shows bytes, speed and time left: {line:?}"
    );
    proxy.cut();
    let sent_at_cut = proxy.sent();
    // What the server kept of it is what the client may skip.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept_at_cut = tus_received(&cluster).expect("an unfinished upload on disk");
    assert!(kept_at_cut > size / 4, "kept {kept_at_cut} of {size}");
    screenshot(&c, "upload-after-cut").await;

    // At 70 %, the manager is killed and started again.
    wait_sent(&c, &proxy, sent_at_cut + size / 5, "after the cut").await;
    cluster.manager.kill9();
    let sent_at_kill = proxy.sent();
    let kept_at_kill = tus_received(&cluster).expect("the upload kept through the kill");
    cluster.restart_manager();
    proxy.retarget(&cluster.manager.url);
    proxy.cut();

    // At 85 %, the uploader reloads the page and chooses the same file
    // again: the page carries on with the upload the browser remembers.
    wait_sent(&c, &proxy, sent_at_cut + size * 7 / 20, "after the restart").await;
    c.refresh().await.unwrap();
    let sent_at_reload = proxy.sent();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept_at_reload = tus_received(&cluster).expect("the upload kept through the reload");
    send_through_page(&c, "Big noise", &input).await;

    // It lands on the movie page, which follows processing step by step,
    // until the movie is published.
    let deadline = Instant::now() + Duration::from_secs(400);
    let mut steps_seen = Vec::new();
    let mut resumed_said = false;
    loop {
        let url = c.current_url().await.unwrap();
        if url.path().starts_with("/assets/") && c.find(Locator::Id("player")).await.is_ok() {
            break;
        }
        if url.path() == "/upload" {
            if let Ok(e) = c.find(Locator::Id("resumed")).await {
                resumed_said |= e.text().await.unwrap_or_default().contains("Carrying on");
            }
        }
        if let Ok(e) = c.find(Locator::Css("#steps [aria-current=step]")).await {
            let now = e.text().await.unwrap_or_default();
            if !steps_seen.contains(&now) {
                steps_seen.push(now);
            }
        }
        assert!(
            Instant::now() < deadline,
            "never published; at {url}, {} bytes sent\n{}",
            proxy.sent(),
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after_cut = proxy.sent() - sent_at_cut;
    let chunk = 32u64 << 20;
    eprintln!("steps seen on the movie page: {steps_seen:?}");
    assert!(!steps_seen.is_empty(), "the movie page showed no step");
    eprintln!(
        "tus in chromium: {size} bytes, cut at {sent_at_cut} sent / {kept_at_cut} kept, \
         {after_cut} sent after the cut (remainder {} + one chunk {chunk})",
        size - kept_at_cut
    );
    // Each interruption costs what was in flight: bytes sent that the
    // server did not keep, at most a chunk each; the page loads and
    // requests in between are small. All told, the bytes sent after the
    // cut are the remainder plus at most one chunk.
    let lost = [
        (
            "the kill",
            sent_at_kill - sent_at_cut,
            kept_at_kill - kept_at_cut,
        ),
        (
            "the reload",
            sent_at_reload - sent_at_kill,
            kept_at_reload - kept_at_kill,
        ),
        (
            "the end",
            proxy.sent() - sent_at_reload,
            size - kept_at_reload,
        ),
    ];
    for (until, sent, kept) in lost {
        eprintln!("until {until}: {sent} bytes sent, {kept} kept");
        assert!(
            sent <= kept + chunk + (1 << 20),
            "until {until}: {sent} sent for {kept} kept"
        );
    }
    assert!(
        after_cut <= size - kept_at_cut + chunk + (1 << 20),
        "{after_cut} bytes sent after the cut for a remainder of {}",
        size - kept_at_cut
    );
    assert!(resumed_said, "after the reload the page said it carried on");
    let asset = c
        .current_url()
        .await
        .unwrap()
        .path()
        .trim_start_matches("/assets/")
        .to_string();
    let v = cluster.asset(&asset).await;
    assert_eq!(v["state"], "published", "{v}");
    assert_eq!(v["title"], "Big noise");
    assert!(
        cluster
            .manager
            .log_text()
            .contains("resumable upload finished"),
        "the upload went by tus"
    );
    screenshot(&c, "upload-published").await;
    c.close().await.unwrap();
}

/// Runs axe-core (tests/vendor/axe-core, from npm) in the current page;
/// returns its violations of impact "serious" or "critical", described.
async fn serious_violations(c: &fantoccini::Client) -> Vec<String> {
    let axe = include_str!("../vendor/axe-core/axe.min.js");
    c.execute(&format!("{axe}\nreturn true;"), vec![])
        .await
        .expect("axe-core loads in the page");
    let v = c
        .execute_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, { resultTypes: ['violations'] })
               .then(r => done(r.violations.map(v => ({
                   id: v.id, impact: v.impact, help: v.help,
                   nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))
               }))))
               .catch(e => done([{ id: 'axe-error', impact: 'critical', help: String(e), nodes: [] }]));",
            vec![],
        )
        .await
        .expect("axe-core runs");
    v.as_array()
        .unwrap()
        .iter()
        .filter(|v| matches!(v["impact"].as_str(), Some("serious") | Some("critical")))
        .map(|v| {
            format!(
                "{} ({}): {} at {}",
                v["id"], v["impact"], v["help"], v["nodes"]
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_passes_the_accessibility_check_at_desktop_and_phone_widths() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("garden.webm");
    make_webm(&input);
    let asset = cluster
        .publish(&input, "Garden at dusk", Duration::from_secs(300))
        .await;
    let profile = cluster.dir.path().join("chromium-profile-a11y");
    let (_driver, driver_url) = start_chromedriver().await;
    let c = chromium(&profile, &driver_url).await;
    let base = cluster.manager.url.clone();
    let shots = e2e::bin_dir().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    let public = [
        ("home", "/".to_string()),
        ("search", "/?q=garden".to_string()),
        ("movie", format!("/assets/{asset}")),
        ("login", "/login".to_string()),
        ("signup", "/signup".to_string()),
        ("status", "/status".to_string()),
    ];
    let signed_in = [
        ("home-signed-in", "/".to_string()),
        ("upload", "/upload".to_string()),
        ("movie-owner", format!("/assets/{asset}")),
        ("account", "/account".to_string()),
        ("terminals", "/terminals".to_string()),
    ];
    // The check itself can fail: a picture without text and a field
    // without a label, put into a page, are found.
    c.goto(&format!("{base}/login")).await.unwrap();
    c.execute(
        "document.querySelector('main').insertAdjacentHTML('beforeend', \
         '<img src=\"/posters/x.jpg\"><input type=\"text\" name=\"unlabelled\">'); return true;",
        vec![],
    )
    .await
    .unwrap();
    let planted = serious_violations(&c).await;
    assert!(
        planted.iter().any(|v| v.contains("image-alt"))
            && planted.iter().any(|v| v.contains("label")),
        "axe-core did not find planted violations: {planted:?}"
    );
    let mut failures = Vec::new();
    for (round, pages) in [("public", &public[..]), ("signed-in", &signed_in[..])] {
        if round == "signed-in" {
            c.set_window_size(1280, 900).await.unwrap();
            log_in(
                &c,
                &base,
                &cluster.operator_email,
                &cluster.operator_password,
            )
            .await;
        }
        for (name, path) in pages.iter() {
            for (width, height, label) in [(1280, 900, "desktop"), (390, 844, "phone")] {
                c.set_window_size(width, height).await.unwrap();
                c.goto(&format!("{base}{path}")).await.unwrap();
                c.wait()
                    .at_most(Duration::from_secs(30))
                    .for_element(Locator::Css("h1"))
                    .await
                    .unwrap_or_else(|e| panic!("{name} ({label}): no heading: {e}"));
                let shot = c.screenshot().await.unwrap();
                let file = shots.join(format!("{name}-{label}.png"));
                std::fs::write(&file, shot).unwrap();
                // Readable on a phone: nothing wider than the screen.
                let overflow = c
                    .execute(
                        "return document.documentElement.scrollWidth - window.innerWidth;",
                        vec![],
                    )
                    .await
                    .unwrap()
                    .as_i64()
                    .unwrap_or(0);
                if overflow > 0 {
                    failures.push(format!(
                        "{name} ({label}): {overflow} px wider than the window"
                    ));
                }
                for v in serious_violations(&c).await {
                    failures.push(format!("{name} ({label}): {v}"));
                }
            }
        }
    }
    eprintln!(
        "screenshots of every page at 1280 and 390 px: {}",
        shots.display()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    c.close().await.unwrap();
}
