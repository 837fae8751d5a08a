//! The view journal (issue 7, docs/credits.md), with real processes:
//!
//! - the manager is stopped, 20 paid views are played from the nodes, the
//!   manager comes back: every grant's served bytes, and every balance, are
//!   exact, and a node made to resend its whole journal changes nothing;
//! - a journal event signed by an unknown node, or by one node in
//!   another's name, is refused with a code.

use std::time::{Duration, Instant};

use e2e::{make_webm, Cluster, ClusterOpts};

const LIMIT: Duration = Duration::from_secs(240);
const VIEWS: usize = 20;
const PRICE: i64 = 10;

use e2e::status_json as json;
use shared::runtime::unix_now as now;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn views_played_while_the_manager_is_down_are_counted_exactly_once() {
    let mut o = ClusterOpts::new(&["utah", "toronto"]);
    o.fixed_ports = true;
    let mut cluster = Cluster::start_with(&o);
    let client = cluster.client();
    let m = cluster.manager.url.clone();

    // A published movie with a price, owned by the operator.
    let input = cluster.dir.path().join("j.webm");
    make_webm(&input);
    let (status, body) = cluster.upload(&input, "Journal").await.unwrap();
    assert_eq!(status, 202, "{body}");
    let asset = body["asset_id"].as_str().unwrap().to_string();
    let v = cluster.wait_terminal(&asset, LIMIT).await;
    assert_eq!(v["state"], "published", "{v}");
    let (s, v) = json(
        client
            .put(format!("{m}/api/v1/assets/{asset}/price"))
            .bearer_auth(&cluster.api_token)
            .json(&serde_json::json!({ "price": PRICE }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{v}");

    // A viewer with 1000 credits.
    let viewer = cluster.buyer("viewer@example.com", 1000);

    // 20 purchases, each redirected to a node while the manager is up.
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut plays = Vec::new();
    for i in 0..VIEWS {
        let (s, v) = json(
            client
                .post(format!("{m}/api/v1/assets/{asset}/purchase"))
                .bearer_auth(&viewer)
                .json(&serde_json::json!({ "request_id": format!("view-{i}") }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["charged_now"], true, "{v}");
        let media = v["media_url"].as_str().unwrap().to_string();
        let r = no_follow.get(&media).send().await.unwrap();
        assert_eq!(r.status(), 302);
        let node_url = r.headers()["location"].to_str().unwrap().to_string();
        plays.push((v["grant_id"].as_str().unwrap().to_string(), node_url));
    }

    // The manager goes away; the nodes keep serving the paid views.
    assert!(cluster.manager.stop(), "manager did not stop cleanly");
    let mut plain_len = None;
    for (_, url) in &plays {
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let body = r.bytes().await.unwrap();
        assert!(body.len() > 1000);
        assert_eq!(*plain_len.get_or_insert(body.len()), body.len());
    }
    let plain_len = plain_len.unwrap() as i64;
    // Each node has journalled (fsynced) what it served, though nobody heard.
    let deadline = Instant::now() + LIMIT;
    loop {
        let lines: usize = cluster
            .nodes
            .iter()
            .map(|n| {
                std::fs::read_to_string(n.storage.join("journal/views.jsonl"))
                    .unwrap_or_default()
                    .lines()
                    .count()
            })
            .sum();
        if lines >= VIEWS {
            break;
        }
        assert!(Instant::now() < deadline, "only {lines} journal lines");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The manager comes back; every event arrives, once.
    cluster.restart_manager();
    let m = cluster.manager.url.clone();
    let grant = |id: String| {
        let client = client.clone();
        let m = m.clone();
        let viewer = viewer.clone();
        async move {
            let (s, v) = json(
                client
                    .get(format!("{m}/api/v1/grants/{id}"))
                    .bearer_auth(&viewer)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(s, 200, "{v}");
            v
        }
    };
    let deadline = Instant::now() + LIMIT;
    loop {
        let mut done = 0;
        for (id, _) in &plays {
            let g = grant(id.clone()).await;
            assert!(
                g["bytes_served"].as_i64().unwrap() <= plain_len,
                "a grant counted twice: {g}"
            );
            done += (g["bytes_served"].as_i64() == Some(plain_len)) as usize;
        }
        if done == VIEWS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done}/{VIEWS} grants complete; manager log:\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A node made to resend its whole journal changes nothing.
    let mut resent = 0;
    for n in &cluster.nodes {
        let cursor = n.storage.join("journal/forwarded");
        if !cursor.exists() {
            continue; // this node served none of the views
        }
        std::fs::remove_file(&cursor).unwrap();
        let deadline = Instant::now() + LIMIT;
        while !cursor.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never resent its journal",
                n.proc.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        resent += 1;
    }
    assert!(resent >= 1, "no node delivered a journal");
    for (id, _) in &plays {
        let g = grant(id.clone()).await;
        assert_eq!(g["bytes_served"].as_i64(), Some(plain_len), "{g}");
        assert_eq!(g["state"], "active", "{g}");
    }

    // Balances: the viewer paid 20 × 10, the uploader got 70 % of each.
    let account = |token: String| {
        let client = client.clone();
        let m = m.clone();
        async move {
            json(
                client
                    .get(format!("{m}/api/v1/account"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
            .1
        }
    };
    let v = account(viewer.clone()).await;
    assert_eq!(v["balance"], 1000 - VIEWS as i64 * PRICE, "{v}");
    let sum: i64 = v["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(sum, v["balance"].as_i64().unwrap(), "ledger sum = balance");
    let v = account(cluster.api_token.clone()).await;
    assert_eq!(v["balance"], VIEWS as i64 * PRICE * 70 / 100, "{v}");

    // Forged journal events are refused with a code.
    let body = serde_json::to_vec(&serde_json::json!({ "events": [{
        "id": "forged-1", "grant": plays[0].0, "asset": asset,
        "bytes": 1, "first_at": now(), "last_at": now() }] }))
    .unwrap();
    let post = |name: &str, key_id: &str, secret: Vec<u8>| {
        let path = format!("/internal/v1/nodes/{name}/journal");
        let auth = shared::sign_request(
            &secret,
            key_id,
            "POST",
            &path,
            now(),
            &shared::content_sha256_hex(&body),
        );
        client
            .post(format!("{m}{path}"))
            .header(shared::AUTH_HEADER, auth)
            .header(shared::DATE_HEADER, now().to_string())
            .body(body.clone())
            .send()
    };
    let (s, v) = json(post("evil", "evil", vec![7u8; 32]).await.unwrap()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("auth_unknown_key")),
        "{v}"
    );
    // Utah's own secret, in Toronto's name.
    let utah = hex::decode(&cluster.nodes[0].secret).unwrap();
    let (s, v) = json(post("toronto", "utah", utah.clone()).await.unwrap()).await;
    assert_eq!(s, 401, "{v}");
    // Toronto's name with a made-up secret.
    let (s, v) = json(post("toronto", "toronto", vec![1u8; 32]).await.unwrap()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("auth_bad_signature")),
        "{v}"
    );
    let g = grant(plays[0].0.clone()).await;
    assert_eq!(g["bytes_served"].as_i64(), Some(plain_len), "{g}");
}
