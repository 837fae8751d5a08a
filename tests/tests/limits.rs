//! Connections that misbehave, against the real binaries (issue 16, item
//! 1; `shared::server`): a request whose headers never finish is closed
//! within the header timeout, on the node and on the manager; with 1,500
//! sockets held open doing nothing, a node still answers `/healthz` and a
//! viewer's range request at once; one address gets its share of
//! connections and no more.

use std::time::{Duration, Instant};

use e2e::{make_webm, Cluster, ClusterOpts};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Sends half a request and waits for the server to close: returns how long
/// that took, or `None` if it did not within `limit`.
async fn closed_after_partial_headers(url: &str, limit: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(host_port(url)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), s.read(&mut buf)).await
        {
            Err(_) => return None,
            // A 408 may come first; the close is what counts.
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => return Some(started.elapsed()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_headers_are_cut_and_idle_sockets_do_not_stop_viewers() {
    let mut o = ClusterOpts::new(&["utah", "toronto"]);
    o.min_replicas = 2;
    o.manager_extra = "[server]\nheader_timeout_secs = 2\n".into();
    o.node_extra = "[server]\nheader_timeout_secs = 2\n".into();
    let cluster = Cluster::start_with(&o);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let (status, body) = cluster.upload(&input, "Limits").await.unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["asset_id"].as_str().unwrap().to_string();
    let asset = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(asset["state"], "published", "{asset}");
    let media_url = asset["media_url"].as_str().unwrap().to_string();

    // Half a request: closed within the 2 s header timeout (give 8 s).
    for url in [&cluster.nodes[0].proc.url, &cluster.manager.url] {
        let took = closed_after_partial_headers(url, Duration::from_secs(8))
            .await
            .unwrap_or_else(|| panic!("{url} kept a half-sent request open"));
        assert!(took >= Duration::from_millis(1500), "{url}: {took:?}");
    }

    // 1,500 sockets that connect and say nothing more than half a request,
    // from 12 addresses (127.0.0.2 to .13: loopback answers them all) as
    // many viewers would, under the cap per address (256).
    let node = &cluster.nodes[0].proc.url;
    let target: std::net::SocketAddr = host_port(node).parse().unwrap();
    let from = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 2 + (i / 125) as u8], 0));
    let mut idle = Vec::new();
    for i in 0..1500 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(from(i)).unwrap();
        let mut s = sock.connect(target).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        idle.push(s);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let started = Instant::now();
    let h = client.get(format!("{node}/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let location = cluster
        .redirect_location(&format!("{media_url}?node=utah"))
        .await;
    let r = client
        .get(&location)
        .header("Range", "bytes=0-1023")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().len(), 1024);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered while 1,500 sockets sat open: {:?}",
        started.elapsed()
    );
    // And they are all gone after the header timeout.
    let mut closed = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    for s in &mut idle {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => continue,
                Ok(_) => {
                    closed += 1;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    assert_eq!(closed, 1500, "every idle socket closed by the node");
    drop(idle);

    // One address alone gets its share (256) and no more: the rest are
    // closed at once, and other addresses are still served.
    let mut mine = Vec::new();
    for _ in 0..300 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(([127, 0, 0, 50], 0).into()).unwrap();
        mine.push(sock.connect(target).await.unwrap());
    }
    // All looked at together, well inside the 2 s header timeout that
    // would close the rest too.
    let mut looks = tokio::task::JoinSet::new();
    for mut s in mine {
        looks.spawn(async move {
            let mut buf = [0u8; 16];
            let closed = matches!(
                tokio::time::timeout(Duration::from_millis(700), s.read(&mut buf)).await,
                Ok(Ok(0)) | Ok(Err(_))
            );
            (closed, s)
        });
    }
    let mut cut = 0;
    let mut keep = Vec::new();
    while let Some(r) = looks.join_next().await {
        let (closed, s) = r.unwrap();
        cut += usize::from(closed);
        keep.push(s);
    }
    assert_eq!(cut, 300 - 256, "closed beyond the share of one address");
    let h = client.get(format!("{node}/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200, "others still served");
    let metrics = cluster.metrics(node).await;
    assert!(
        metrics.contains("viewnode_http_connections_open"),
        "the node counts its connections"
    );
}
