//! The operator is told first and users see the truth (docs/operations.md,
//! "Monitoring and alerts" and "The status page"), with real processes: a
//! webhook receiver on loopback that checks the Standard Webhooks
//! signature, a real SMTP server (Python's aiosmtpd) that keeps what it
//! gets, and drills: a node stopped, a node started with another
//! configuration, the manager's disk full under its database, and the
//! manager stopped while the nodes keep serving the status page.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine;
use e2e::{free_port, make_webm, Cluster, ClusterOpts};
use hmac::Mac;

const SECRET_B64: &str = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the webhook receiver got: (signature verified, body).
type Received = Arc<Mutex<Vec<(bool, serde_json::Value)>>>;

/// A webhook receiver on loopback: answers 200 to every POST and keeps
/// the body with whether its Standard Webhooks signature was right.
fn receiver() -> (u16, Received) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got: Received = Arc::default();
    let keep = got.clone();
    std::thread::spawn(move || {
        let key = base64::engine::general_purpose::STANDARD
            .decode(SECRET_B64)
            .unwrap();
        for s in l.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let h = |k: &str| {
                headers
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let len: usize = h("content-length").parse().unwrap_or(0);
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
            mac.update(format!("{}.{}.", h("webhook-id"), h("webhook-timestamp")).as_bytes());
            mac.update(&body);
            let want = format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            );
            let signed = h("webhook-signature") == want;
            if let Ok(v) = serde_json::from_slice(&body) {
                keep.lock().unwrap().push((signed, v));
            }
            let mut s = s;
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nreceived",
            );
        }
    });
    (port, got)
}

/// Python's aiosmtpd on loopback, keeping each message in a mailbox.
struct Smtp {
    child: Child,
    mailbox: PathBuf,
}

impl Smtp {
    fn start(dir: &Path) -> (u16, Smtp) {
        let port = free_port();
        let mailbox = dir.join("mailbox");
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&mailbox)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("smtp.log")).unwrap())
            .spawn()
            .expect("python3-aiosmtpd (scripts/setup test installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        (port, Smtp { child, mailbox })
    }

    /// Every message received so far, as text.
    fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            for e in std::fs::read_dir(self.mailbox.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for<F: std::future::Future<Output = Option<String>>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    loop {
        let Some(why) = f().await else { return };
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last seen: {why}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether the receiver got `status` (firing/resolved) for `check`, signed.
fn webhook_got(got: &Received, check: &str, status: &str) -> bool {
    got.lock().unwrap().iter().any(|(signed, v)| {
        *signed
            && v["version"] == "4"
            && v["status"] == status
            && v["alerts"][0]["labels"]["alertname"] == check
    })
}

async fn checks(cluster: &Cluster) -> serde_json::Value {
    let (s, v) = cluster
        .get_as(&cluster.api_token, "/api/v1/admin/checks")
        .await;
    assert_eq!(s, 200, "{v}");
    v
}

fn check_state(v: &serde_json::Value, id: &str) -> String {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check_id"] == id)
        .map(|c| format!("{} ({})", c["state"].as_str().unwrap_or(""), c["detail"]))
        .unwrap_or_else(|| "absent".into())
}

async fn text(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The `data-state` of a component on a status page.
fn component_state(html: &str, component: &str) -> String {
    let at = html
        .find(&format!("data-component=\"{component}\""))
        .unwrap_or_else(|| panic!("{component} on the page: {html}"));
    let rest = &html[at..];
    let s = rest.find("data-state=\"").unwrap() + 12;
    rest[s..s + rest[s..].find('"').unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_is_told_first_and_the_status_page_tells_users() {
    let (hook_port, got) = receiver();
    let tmp = tempfile::tempdir().unwrap();
    let (smtp_port, smtp) = Smtp::start(tmp.path());
    let mut o = ClusterOpts::new(&["utah", "toronto"]);
    o.fixed_ports = true;
    o.node_extra = "status_stale_secs = 8\n".into();
    o.manager_extra = format!(
        "[monitor]\ninterval_secs = 5\nlow_disk_percent = 1\n\
         [alerts]\nmin_gap_secs = 1\nrepeat_secs = 0\n\
         [[alerts.webhooks]]\nname = \"ops\"\nurl = \"http://127.0.0.1:{hook_port}/hook\"\nsecret = \"whsec_{SECRET_B64}\"\n\
         [alerts.email]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {smtp_port}\ntls = \"none\"\n\
         from = \"slmedia <alerts@example.com>\"\nto = [\"ops@example.com\"]\n"
    );
    let mut cluster = Cluster::start_with(&o);
    let m = cluster.manager.url.clone();

    // A movie, so the viewer's path has a canary to play.
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let (s, v) = cluster.upload(&input, "Canary").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let asset = v["asset_id"].as_str().unwrap().to_string();
    let v = cluster
        .wait_terminal(&asset, Duration::from_secs(240))
        .await;
    assert_eq!(v["state"], "published", "{v}");

    // Every check passes, the viewer's path on each node included.
    wait_for("every check ok", Duration::from_secs(90), || async {
        let v = checks(&cluster).await;
        for id in [
            "manager.database",
            "manager.storage",
            "media.redirect",
            "node.utah",
            "node.toronto",
            "playback.utah",
            "playback.toronto",
            "drift.utah",
            "drift.toronto",
            "books",
        ] {
            let s = check_state(&v, id);
            if !s.starts_with("ok") {
                return Some(format!("{id}: {s}"));
            }
            // The canary is played once the movie is published.
            if id.starts_with("playback.") && !s.contains("right bytes") {
                return Some(format!("{id}: {s}"));
            }
            if id == "media.redirect" && !s.contains("200 video/mp4") {
                return Some(format!("{id}: {s}"));
            }
        }
        None
    })
    .await;

    // The channels' test buttons: the answer from the receiving end.
    for channel in ["webhook:ops", "email"] {
        let r = cluster
            .client()
            .post(format!("{m}/api/v1/admin/alerts/test"))
            .bearer_auth(&cluster.api_token)
            .json(&serde_json::json!({ "channel": channel }))
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["delivered"], true, "{channel}: {v}");
    }
    assert!(
        smtp.messages().iter().any(|t| t.contains("[TEST]")),
        "the test e-mail arrived"
    );

    // Drill 1: a node stops. Told within a minute; the status page shows
    // its region down; resolved when it is back.
    let started = Instant::now();
    assert!(cluster.nodes[1].proc.stop());
    wait_for(
        "a firing alert for node.toronto",
        Duration::from_secs(60),
        || async {
            (!webhook_got(&got, "node.toronto", "firing"))
                .then(|| format!("{:?}", got.lock().unwrap().len()))
        },
    )
    .await;
    eprintln!("node.toronto alert after {:?}", started.elapsed());
    let (s, page) = text(&format!("{m}/status")).await;
    assert_eq!(s, 200);
    assert_eq!(component_state(&page, "playback:toronto"), "down", "{page}");
    assert_eq!(component_state(&page, "playback:utah"), "ok", "{page}");
    let (_, badge) = text(&format!("{m}/status/badge.svg")).await;
    assert!(badge.contains("outage"), "{badge}");
    wait_for("the alert by e-mail", Duration::from_secs(60), || async {
        (!smtp
            .messages()
            .iter()
            .any(|t| t.contains("[FIRING] node.toronto")))
        .then(|| format!("{} messages", smtp.messages().len()))
    })
    .await;
    cluster.restart_node(1);
    wait_for("node.toronto resolved", Duration::from_secs(60), || async {
        (!webhook_got(&got, "node.toronto", "resolved")).then(String::new)
    })
    .await;

    // Drill 2: a node started with another shared configuration (another
    // token key): drift shown and alerted, resolved once put right.
    let cfg_path = cluster.nodes[0].config.clone();
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let other = shared::TokenSigner::generate().public_hex();
    let mine = cluster.token_signer.public_hex();
    assert!(cluster.nodes[0].proc.stop());
    std::fs::write(&cfg_path, original.replace(&mine, &other)).unwrap();
    cluster.restart_node(0);
    wait_for(
        "a drift alert for utah",
        Duration::from_secs(60),
        || async {
            let state = check_state(&checks(&cluster).await, "drift.utah");
            (!webhook_got(&got, "drift.utah", "firing")).then_some(state)
        },
    )
    .await;
    let v = checks(&cluster).await;
    assert!(check_state(&v, "drift.utah").contains("fingerprint"), "{v}");
    assert!(cluster.nodes[0].proc.stop());
    std::fs::write(&cfg_path, &original).unwrap();
    cluster.restart_node(0);
    wait_for("drift.utah resolved", Duration::from_secs(60), || async {
        (!webhook_got(&got, "drift.utah", "resolved")).then(String::new)
    })
    .await;

    // Drill 3: the manager's database cannot be written (its disk full).
    // Its /healthz answers 503 and the operator is told; fixed, resolved.
    let data = cluster.manager_data.clone();
    assert!(cluster.manager.stop());
    let _mount =
        e2e::Tmpfs::move_onto(&data, &cluster.dir.path().join("manager-data-aside"), "64m");
    cluster.restart_manager();
    let m = cluster.manager.url.clone();
    wait_for(
        "the database ok again after the move",
        Duration::from_secs(60),
        || async {
            let s = check_state(&checks(&cluster).await, "manager.database");
            (!s.starts_with("ok")).then_some(s)
        },
    )
    .await;
    let filler = data.join("filler");
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=1M", "count=100"])
        .stderr(Stdio::null())
        .status();
    wait_for("/healthz 503", Duration::from_secs(30), || async {
        let (s, body) = text(&format!("{m}/healthz")).await;
        (s != 503).then(|| format!("{s} {body}"))
    })
    .await;
    let (_, body) = text(&format!("{m}/healthz")).await;
    eprintln!("healthz on a full disk: {body}");
    wait_for(
        "a firing alert for the database or its disk",
        Duration::from_secs(60),
        || async {
            let told = ["manager.database", "manager.storage"]
                .iter()
                .any(|c| webhook_got(&got, c, "firing"));
            (!told).then(|| format!("{} webhook bodies", got.lock().unwrap().len()))
        },
    )
    .await;
    std::fs::remove_file(&filler).unwrap();
    wait_for(
        "resolved once the disk has room",
        Duration::from_secs(60),
        || async {
            let (s, body) = text(&format!("{m}/healthz")).await;
            let resolved = ["manager.database", "manager.storage"]
                .iter()
                .filter(|c| webhook_got(&got, c, "firing"))
                .all(|c| webhook_got(&got, c, "resolved"));
            (s != 200 || !resolved).then(|| format!("healthz {s} {body}"))
        },
    )
    .await;

    // Drill 4: the manager stops; each node still serves the status page,
    // and soon says the manager is unreachable.
    let node_status = |i: usize| format!("{}/status", cluster.nodes[i].proc.url);
    let (s, page) = text(&node_status(0)).await;
    assert_eq!(s, 200, "{page}");
    assert!(
        page.contains("node-stamp") && page.contains("data-component=\"web\""),
        "{page}"
    );
    assert!(!page.contains("manager-unreachable"), "{page}");
    assert!(cluster.manager.stop());
    for i in 0..2 {
        let url = node_status(i);
        wait_for(
            "the banner on a node's copy",
            Duration::from_secs(30),
            || async {
                let (s, page) = text(&url).await;
                (s != 200 || !page.contains("manager-unreachable")).then(|| format!("{s}"))
            },
        )
        .await;
        let (_, page) = text(&url).await;
        assert!(page.contains("data-component=\"playback:utah\""), "{page}");
    }
}
