//! Handler tests through the manager's real router (`oneshot`), no sockets,
//! no ffmpeg work: authentication, CSRF, the stable error codes, the answer
//! MACs on node calls, and the headers every page carries.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{header, Request, StatusCode},
    Router,
};
use http_body_util::BodyExt;
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    app: Router,
    db: manager::catalog::SharedCatalog,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("manager.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
            data_dir = "{}"
            master_key = "{}"
            token_signing_key = "{}"
            [[nodes]]
            name = "utah"
            url = "http://127.0.0.1:9"
            lat = 40.76
            lon = -111.89
            secret = "{}"
            [[nodes]]
            name = "toronto"
            url = "http://127.0.0.1:9"
            lat = 43.65
            lon = -79.38
            secret = "{}"
            "#,
            dir.path().join("data").display(),
            "11".repeat(32),
            "22".repeat(32),
            "33".repeat(16),
            "44".repeat(16),
        ),
    )
    .unwrap();
    let cfg = manager::Config::load(Some(&cfg)).unwrap();
    let state = manager::AppState::new(cfg, "http://manager.test".into())
        .await
        .unwrap();
    Fixture {
        db: state.db.clone(),
        app: manager::build_router(Arc::new(state)),
        _dir: dir,
    }
}

/// A request as it arrives from a client at 198.51.100.7.
fn from_client(mut r: Request<Body>) -> Request<Body> {
    r.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([198, 51, 100, 7], 40000))));
    r
}

async fn send(f: &Fixture, r: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let resp = f.app.clone().oneshot(from_client(r)).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn the_api_needs_a_caller_and_every_answer_refuses_framing() {
    let f = fixture().await;
    let (s, h, body) = send(
        &f,
        Request::get("/api/v1/account").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(h[header::CONTENT_SECURITY_POLICY], "frame-ancestors 'none'");
    let (s, _, body) = send(
        &f,
        Request::get("/api/v1/account")
            .header(header::AUTHORIZATION, "Bearer not-a-token")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    let (s, h, _) = send(&f, Request::get("/login").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
}

#[tokio::test]
async fn log_in_checks_csrf_then_bounds_before_any_hash() {
    let f = fixture().await;
    let form = |csrf: &str, email: &str| {
        Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, "slm_login_csrf=abc")
            .body(Body::from(format!(
                "csrf={csrf}&email={email}&password=whatever"
            )))
            .unwrap()
    };
    let (s, _, body) = send(&f, form("forged", "a@example.com")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(body.contains("csrf_failed"), "{body}");
    let long = format!("{}@example.com", "a".repeat(300));
    let (s, _, body) = send(&f, form("abc", &long)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains("login_invalid"), "{body}");
    let (s, _, _) = send(&f, form("abc", "nobody@example.com")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a wrong password");
}

#[tokio::test]
async fn media_urls_and_terminals_refuse_with_stable_codes() {
    let f = fixture().await;
    let (s, _, body) = send(
        &f,
        Request::get("/media/not.a-token/m.mp4")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::FORBIDDEN, "token_malformed")
    );
    let (s, _, body) = send(
        &f,
        Request::get("/media/m.mp4").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::FORBIDDEN, "token_missing")
    );
    let (s, _, body) = send(
        &f,
        Request::get(format!("/media/g/{}/m.mp4", "0".repeat(32)))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let now = shared::runtime::unix_now();
    let (s, _, body) = send(
        &f,
        Request::post("/api/v1/terminal/buy")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!(
                "terminal=nope&asset=m&avatar=a&request=r1&ts={now}&nonce=n1"
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "terminal_unknown")
    );
}

#[tokio::test]
async fn node_calls_need_the_node_signature_and_answers_carry_a_mac() {
    let f = fixture().await;
    let path = "/internal/v1/nodes/utah/paid-epochs";
    let (s, h, body) = send(&f, Request::get(path).body(Body::empty()).unwrap()).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "auth_missing")
    );
    assert!(
        !h.contains_key(shared::ANSWER_MAC_HEADER),
        "no MAC on a refusal"
    );
    // Signed by utah with its secret: answered, and the answer is MACed
    // for this very request.
    let secret = hex::decode("33".repeat(16)).unwrap();
    let now = shared::runtime::unix_now();
    let auth = shared::sign_request(
        &secret,
        "utah",
        "GET",
        path,
        now,
        &shared::content_sha256_hex(b""),
    );
    let (s, h, body) = send(
        &f,
        Request::get(path)
            .header(shared::AUTH_HEADER, &auth)
            .header(shared::DATE_HEADER, now.to_string())
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let mac = h[shared::ANSWER_MAC_HEADER].to_str().unwrap();
    assert!(shared::verify_answer_mac(
        &secret,
        &auth,
        200,
        body.as_bytes(),
        mac
    ));
    let list: shared::protocol::PaidEpochs = serde_json::from_str(&body).unwrap();
    assert_eq!(list.node, "utah");
    // Signed by toronto in utah's name: refused.
    let other = hex::decode("44".repeat(16)).unwrap();
    let forged = shared::sign_request(
        &other,
        "toronto",
        "GET",
        path,
        now,
        &shared::content_sha256_hex(b""),
    );
    let (s, _, body) = send(
        &f,
        Request::get(path)
            .header(shared::AUTH_HEADER, &forged)
            .header(shared::DATE_HEADER, now.to_string())
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "auth_unknown_key")
    );
}

#[tokio::test]
async fn health_exercises_the_database_and_the_disk() {
    let f = fixture().await;
    let (s, _, body) = send(&f, Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["checks"]["database"], "ok");
    assert_eq!(v["checks"]["storage"], "ok");
}

/// An API token for a new account with `role`.
async fn token_for(f: &Fixture, email: &str, role: &str) -> String {
    let id =
        f.db.create_account(email, "x", role.parse().unwrap(), 0)
            .await
            .unwrap();
    let token = manager::auth::random_token();
    f.db.insert_api_token(&manager::auth::token_hash(&token), id, "t")
        .await
        .unwrap();
    token
}

#[tokio::test]
async fn operators_read_workers_and_alerts_and_nobody_else_does() {
    let f = fixture().await;
    let get = |path: &str, token: Option<&str>| {
        let mut r = Request::get(path);
        if let Some(t) = token {
            r = r.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        r.body(Body::empty()).unwrap()
    };
    let uploader = token_for(&f, "u@example.com", "uploader").await;
    let operator = token_for(&f, "o@example.com", "operator").await;
    for path in ["/api/v1/admin/workers", "/api/v1/admin/alerts"] {
        let (s, _, body) = send(&f, get(path, None)).await;
        assert_eq!(
            (s, code(&body)),
            (StatusCode::UNAUTHORIZED, "unauthenticated".into())
        );
        let (s, _, body) = send(&f, get(path, Some(&uploader))).await;
        assert_eq!(
            (s, code(&body)),
            (StatusCode::FORBIDDEN, "forbidden".into()),
            "{path}"
        );
    }
    // A worker's run and an alert, as the background loops report them.
    let w = manager::workers::Worker::register("handler-test-worker");
    w.started();
    w.finished(Err::<(), _>("the disk is full"));
    manager::alerts::raise("handler_test_alert", "a test alert", "detail=1".into());
    let (s, _, body) = send(&f, get("/api/v1/admin/workers", Some(&operator))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mine = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "handler-test-worker")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(mine["state"], "idle");
    assert_eq!(mine["runs"], 1);
    assert_eq!(mine["failures"], 1);
    assert_eq!(mine["last_error"], "the disk is full");
    let (s, _, body) = send(&f, get("/api/v1/admin/alerts", Some(&operator))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["alert"] == "handler_test_alert" && a["detail"] == "detail=1"),
        "{v}"
    );
}
