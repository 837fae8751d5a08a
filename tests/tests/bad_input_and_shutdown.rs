//! An upload cut off midway leaves nothing; SIGTERM lets a download in
//! flight finish and every process exits cleanly.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use e2e::{files_under, make_webm, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_midway_leaves_nothing_behind() {
    let cluster = Cluster::start(&["utah", "toronto"]);
    let addr = cluster
        .manager
        .url
        .trim_start_matches("http://")
        .to_string();
    let boundary = "----slmediaTestBoundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nCut off\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.mp4\"\r\n\
         Content-Type: video/mp4\r\n\r\n"
    );
    let declared = head.len() + 50_000_000;
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /api/v1/uploads HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n\r\n{head}",
        cluster.api_token
    )
    .unwrap();
    let chunk = vec![0x55u8; 64 * 1024];
    for _ in 0..32 {
        s.write_all(&chunk).unwrap();
    }
    s.flush().unwrap();
    // Wait until the server has written part of it, then vanish.
    let staging = cluster.manager_data.join("staging");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !files_under(&staging)
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "upload"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "upload never reached staging"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s);

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = files_under(&staging);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "partial upload left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mine = cluster.my_assets().await;
    assert_eq!(mine.len(), 0, "{mine:?}");
    // The manager is still healthy afterwards.
    let h = cluster
        .client()
        .get(format!("{}/healthz", cluster.manager.url))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_a_download_in_flight_and_exits_cleanly() {
    let mut cluster = Cluster::start(&["utah", "toronto"]);
    let input = cluster.dir.path().join("in.webm");
    make_webm(&input);
    let (_, body) = cluster.upload(&input, "Shutdown").await.unwrap();
    let id = body["asset_id"].as_str().unwrap().to_string();
    let asset = cluster.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(asset["state"], "published", "{asset}");
    let media_url = asset["media_url"].as_str().unwrap();
    let whole = cluster
        .client()
        .get(media_url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    // Find the node the redirect points to and download from it slowly.
    let location = cluster.redirect_location(media_url).await;
    let idx = cluster
        .nodes
        .iter()
        .position(|n| location.starts_with(&n.proc.url))
        .unwrap();
    let addr = cluster.nodes[idx]
        .proc
        .url
        .trim_start_matches("http://")
        .to_string();
    let path = &location[location.find("/play/").unwrap()..];
    let mut s = TcpStream::connect(&addr).unwrap();
    // A tiny receive window keeps most of the body on the server side.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 512];
    let n = s.read(&mut first).unwrap();
    assert!(n > 0);

    let node = &mut cluster.nodes[idx].proc;
    let pid_stop = std::thread::scope(|scope| {
        let h = scope.spawn(|| node.stop());
        std::thread::sleep(Duration::from_millis(300));
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        let mut all = first[..n].to_vec();
        all.extend(rest);
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(all.starts_with(b"HTTP/1.1 200"));
        assert_eq!(
            &all[split..],
            &whole[..],
            "the download in flight must complete intact"
        );
        h.join().unwrap()
    });
    assert!(pid_stop, "the node must exit 0 after SIGTERM");
    assert!(
        cluster.manager.stop(),
        "the manager must exit 0 after SIGTERM"
    );
    let other = 1 - idx;
    assert!(cluster.nodes[other].proc.stop());
    assert!(cluster.manager.log_text().contains("manager stopped"));
}
