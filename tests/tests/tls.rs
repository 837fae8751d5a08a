//! Manager <-> node traffic is private and authenticated both ways
//! (docs/operations.md, "TLS inside the cluster"), with real processes:
//! a cluster on TLS publishes and plays; a node presenting a certificate
//! from another CA is refused, with a log line that says so; an answer
//! nobody MACed (someone on the path of a plain-HTTP node) is never taken
//! as a stored copy; a node behind an nginx TLS reverse proxy still serves
//! ranges and logs the viewer's own address.

use std::{
    io::{Read, Write},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use e2e::{bin, free_port, make_webm, Cluster, ClusterOpts, Proc};

const LIMIT: Duration = Duration::from_secs(240);

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_cluster_publishes_and_plays_and_refuses_a_foreign_certificate() {
    let mut o = ClusterOpts::new(&["utah", "toronto"]);
    o.tls = true;
    o.fixed_ports = true;
    let mut cluster = Cluster::start_with(&o);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let (s, v) = cluster.upload(&input, "Over TLS").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let asset = v["asset_id"].as_str().unwrap().to_string();
    // Published means both pushes were answered, over TLS, with the
    // nodes' MACs.
    let v = cluster.wait_terminal(&asset, LIMIT).await;
    assert_eq!(v["state"], "published", "{v}");
    // Viewers go to the nodes' plain ports and play.
    let media_url = v["media_url"].as_str().unwrap().to_string();
    let loc = cluster.redirect_location(&media_url).await;
    assert!(
        loc.starts_with(&cluster.nodes[0].proc.url) || loc.starts_with(&cluster.nodes[1].proc.url),
        "{loc}"
    );
    let r = cluster
        .client()
        .get(&loc)
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    // The plain port takes no manager calls at all, signed or not.
    let r = cluster
        .node_call(0, reqwest::Method::GET, "/internal/v1/blobs")
        .await;
    assert_eq!(r.status(), 404);

    // Toronto now presents a certificate another CA issued (an impostor
    // on its address): the manager refuses it and says why.
    let other = shared::tls::ClusterCa::generate("impostor").unwrap();
    let issued = other.issue("toronto", &["127.0.0.1".into()]).unwrap();
    cluster.nodes[1].proc.stop();
    std::fs::write(cluster.dir.path().join("toronto.crt"), issued.cert_pem).unwrap();
    std::fs::write(cluster.dir.path().join("toronto.key"), issued.key_pem).unwrap();
    cluster.restart_node(1);
    let m = cluster.manager.url.clone();
    let client = cluster.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h: serde_json::Value = client
            .get(format!("{m}/healthz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["nodes"]["toronto"] == "failing" {
            break;
        }
        assert!(Instant::now() < deadline, "{h}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = cluster.manager.log_text();
    assert!(
        log.contains("node_tls_refused") && log.contains("toronto"),
        "{log}"
    );
    // Viewers are sent to utah only now.
    for _ in 0..5 {
        let loc = cluster.redirect_location(&media_url).await;
        assert!(loc.starts_with(&cluster.nodes[0].proc.url), "{loc}");
    }
}

/// What `manager init-cluster --tls` writes is a working cluster as it
/// stands: the node serves the manager's calls over TLS on its port + 10
/// with a certificate the written CA issued, and the manager, started from
/// its written file, reaches it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_cluster_tls_writes_a_cluster_that_talks_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (mport, nport, other) = (free_port(), free_port(), free_port());
    let out = Command::new(bin("manager"))
        .args(["init-cluster", "--tls", "--dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{mport}")])
        .args(["--node", &format!("utah:40.76:-111.89:127.0.0.1:{nport}")])
        // Never started: the manager's probe of utah is what is looked at.
        .args(["--node", &format!("toronto:43.65:-79.38:127.0.0.1:{other}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Checks every 5 s, and an operator to read them.
    let mcfg = dir.path().join("manager.toml");
    let mut text = std::fs::read_to_string(&mcfg).unwrap();
    text.push_str("\n[monitor]\ninterval_secs = 5\n");
    std::fs::write(&mcfg, text).unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(bin("manager"))
            .arg("--config")
            .arg(&mcfg)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    cli(&[
        "create-user",
        "--email",
        "op@example.com",
        "--role",
        "operator",
        "--generate-password",
    ]);
    let token = cli(&["create-token", "--email", "op@example.com"]);
    let node = Proc::spawn(
        "utah",
        &bin("viewnode"),
        &dir.path().join("viewnode-utah.toml"),
        dir.path().join("utah.log"),
    );
    assert_eq!(node.url, format!("http://127.0.0.1:{nport}"));
    let tls_url = format!("https://127.0.0.1:{}", nport + 10);
    // Trusting the written CA alone, the TLS port answers as utah.
    let ca = std::fs::read(dir.path().join("cluster-ca.pem")).unwrap();
    let trusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let h: serde_json::Value = trusting
        .get(format!("{tls_url}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["node"], "utah", "{h}");
    // Anyone else's trust store refuses that certificate.
    let e = reqwest::Client::new()
        .get(format!("{tls_url}/healthz"))
        .send()
        .await;
    assert!(e.is_err(), "a certificate only the cluster CA vouches for");
    // The manager, from its written file, probes the node over TLS.
    let manager = Proc::spawn(
        "manager",
        &bin("manager"),
        &dir.path().join("manager.toml"),
        dir.path().join("manager.log"),
    );
    let healthy = |l: &str| l.contains("node healthy") && l.contains("utah");
    wait_for("the manager's probe of utah over TLS", || {
        manager.log_text().lines().any(healthy)
    })
    .await;
    let log = manager.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("node_tls_refused") && l.contains("utah")),
        "{log}"
    );
    // The monitor read the certificate utah answered with, and the CA's.
    let mut last = serde_json::Value::Null;
    for _ in 0..60 {
        let r = reqwest::Client::new()
            .get(format!("{}/api/v1/admin/checks", manager.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        last = r.json().await.unwrap();
        let detail = |id: &str| {
            last["checks"]
                .as_array()
                .and_then(|a| a.iter().find(|c| c["check_id"] == id))
                .map(|c| {
                    (
                        c["state"].clone(),
                        c["detail"].as_str().unwrap_or("").to_string(),
                    )
                })
        };
        if let (Some((s1, d1)), Some((s2, d2))) = (detail("cert.utah"), detail("cert.manager")) {
            if d1.contains("its address for the manager expires soonest") {
                assert_eq!(s1, "ok", "{d1}");
                assert_eq!(s2, "ok", "{d2}");
                assert!(d2.contains("the cluster CA"), "{d2}");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("no certificate check for utah: {last}");
}

/// A fake "node" on the path: answers every request with `201` and a
/// plausible body, but cannot MAC what it says. Returns its port.
fn impostor() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                // Swallow the request (a push body, too) until it stops.
                let mut buf = vec![0u8; 1 << 16];
                let mut head = Vec::new();
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            head.extend_from_slice(&buf[..n]);
                            if head.starts_with(b"GET") && head.windows(4).any(|w| w == b"\r\n\r\n")
                            {
                                break;
                            }
                        }
                    }
                }
                let body = if head.starts_with(b"GET /internal/v1/blobs") {
                    "{\"blobs\":[]}"
                } else if head.starts_with(b"GET /healthz") {
                    "{\"status\":\"ok\"}"
                } else {
                    "{\"stored\":true,\"verified\":true}"
                };
                let status = if head.starts_with(b"GET") {
                    "200 OK"
                } else {
                    "201 Created"
                };
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_the_node_did_not_mac_is_never_a_stored_copy() {
    // Toronto's address leads to an impostor (someone on the path of a
    // plain-HTTP node): its "201" must not count.
    let cluster = Cluster::start(&["utah", "toronto"]);
    let fake = impostor();
    let cfg = std::fs::read_to_string(&cluster.manager_config).unwrap();
    let cfg = cfg.replace(
        &format!("url = \"{}\"", cluster.nodes[1].proc.url),
        &format!("url = \"http://127.0.0.1:{fake}\""),
    );
    std::fs::write(&cluster.manager_config, cfg).unwrap();
    let mut cluster = cluster;
    cluster.manager.stop();
    cluster.restart_manager();
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let (s, v) = cluster.upload(&input, "On the path").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let asset = v["asset_id"].as_str().unwrap().to_string();
    let client = cluster.client();
    let m = cluster.manager.url.clone();
    let token = cluster.api_token.clone();
    wait_for("the push to the impostor", || {
        cluster.manager.log_text().contains("answer_unauthentic")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v: serde_json::Value = client
        .get(format!("{m}/api/v1/assets/{asset}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(v["state"], "published", "{v}");
    let toronto = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == "toronto")
        .cloned()
        .unwrap_or_default();
    assert_ne!(toronto["state"], "verified", "{v}");
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_behind_a_tls_reverse_proxy_serves_ranges_and_sees_the_viewer() {
    let mut o = ClusterOpts::new(&["utah"]);
    o.min_replicas = 1;
    // nginx connects from 127.0.0.1; the viewer comes from 127.0.0.2.
    o.node_extra = "trusted_proxies = [\"127.0.0.1/32\"]\n".into();
    let cluster = Cluster::start_with(&o);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let (s, v) = cluster.upload(&input, "Proxied").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let asset = v["asset_id"].as_str().unwrap().to_string();
    let v = cluster.wait_terminal(&asset, LIMIT).await;
    assert_eq!(v["state"], "published", "{v}");
    let loc = cluster
        .redirect_location(v["media_url"].as_str().unwrap())
        .await;
    let play_path = &loc[loc.find("/play/").unwrap()..];

    // The operator's proxy: nginx with a certificate viewers trust (here a
    // CA of the test's own), as docs/operations.md shows.
    let dir = cluster.dir.path().join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = shared::tls::ClusterCa::generate("viewers").unwrap();
    let site = ca.issue("proxy", &["127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("site.crt"), site.cert_pem).unwrap();
    std::fs::write(dir.join("site.key"), site.key_pem).unwrap();
    let port = free_port();
    let upstream = cluster.nodes[0].proc.url.trim_start_matches("http://");
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{}}\nhttp {{\n access_log {d}/access.log;\n client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             server {{\n  listen 127.0.0.1:{port} ssl;\n  ssl_certificate {d}/site.crt;\n\
             ssl_certificate_key {d}/site.key;\n  location / {{\n   proxy_pass http://{upstream};\n\
             proxy_http_version 1.1;\n   proxy_set_header Host $host;\n\
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
             proxy_set_header X-Forwarded-Proto https;\n   proxy_buffering off;\n  }}\n }}\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .args(["-p"])
        .arg(&dir)
        .args(["-c"])
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (installed by scripts/setup test)");
    let _nginx = Nginx(child);
    let viewer = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}{play_path}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        match viewer
            .get(&url)
            .header("range", "bytes=100-199")
            .send()
            .await
        {
            Ok(r) => break r,
            Err(e) => {
                assert!(Instant::now() < deadline, "nginx did not answer: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!(
            "bytes 100-199/{}",
            cluster.client().head(&loc).send().await.unwrap().headers()["content-length"]
                .to_str()
                .unwrap()
        )
    );
    let through_proxy = r.bytes().await.unwrap();
    let direct = cluster
        .client()
        .get(&loc)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(through_proxy, direct);
    // The node logged the viewer, not the proxy.
    wait_for("the node's access log line", || {
        cluster.nodes[0]
            .proc
            .log_text()
            .lines()
            .any(|l| l.contains("/play/") && l.contains("client=127.0.0.2"))
    })
    .await;
}
