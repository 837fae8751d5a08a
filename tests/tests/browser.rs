//! A person's path in a real browser: log in, upload through the web form
//! (with its progress bar), wait on the movie page, and play the movie in
//! the page's `<video>` through the media URL. Debian's chromium and
//! chromedriver are installed by scripts/test; their absence fails the test.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use e2e::{make_webm, Cluster};
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_movie_uploaded_through_the_web_form_plays_in_chromium() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("garden.webm");
    make_webm(&input);
    let profile = cluster.dir.path().join("chromium-profile");
    let (_driver, driver_url) = start_chromedriver().await;

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
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver_url)
        .await
        .expect("connect to chromedriver");
    let base = &cluster.manager.url;

    // Log in through the form.
    c.goto(&format!("{base}/login")).await.unwrap();
    c.find(Locator::Css("input[name=email]"))
        .await
        .unwrap()
        .send_keys(&cluster.operator_email)
        .await
        .unwrap();
    c.find(Locator::Css("input[name=password]"))
        .await
        .unwrap()
        .send_keys(&cluster.operator_password)
        .await
        .unwrap();
    c.find(Locator::Css("main form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
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
    c.find(Locator::Css("input[name=title]"))
        .await
        .unwrap()
        .send_keys("Garden")
        .await
        .unwrap();
    c.find(Locator::Css("input[name=file]"))
        .await
        .unwrap()
        .send_keys(input.to_str().unwrap())
        .await
        .unwrap();
    c.find(Locator::Id("send"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

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
    c.execute(
        "const v = document.getElementById('player'); v.muted = true; v.play(); return true;",
        vec![],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
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
            break s;
        }
        assert!(Instant::now() < deadline, "video did not play: {s}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
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
    c.close().await.unwrap();
}
