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
    password_checks: Arc<tokio::sync::Semaphore>,
    minter: Arc<manager::redirect::Minter>,
}

async fn fixture() -> Fixture {
    fixture_with("").await
}

/// The fixture with `extra` TOML tables appended to its configuration.
async fn fixture_with(extra: &str) -> Fixture {
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
            {extra}
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
        password_checks: state.password_checks.clone(),
        minter: state.minter.clone(),
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
    // Every password slot taken (a flood in progress): the next log-in
    // waits briefly, then is told to come back, without hashing.
    let all = f
        .password_checks
        .clone()
        .acquire_many_owned(manager::auth::MAX_PASSWORD_CHECKS as u32)
        .await
        .unwrap();
    let (s, _, body) = send(&f, form("abc", "nobody@example.com")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(body.contains("busy"), "{body}");
    drop(all);
    let (s, _, _) = send(&f, form("abc", "nobody@example.com")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "slots free again");
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

/// A request with `token` as its bearer and a JSON body.
fn api(method: &str, path: &str, token: &str, body: serde_json::Value) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The `name=value` of a `Set-Cookie` named `name`.
fn set_cookie(h: &axum::http::HeaderMap, name: &str) -> Option<String> {
    h.get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").to_string())
        .find(|kv| kv.starts_with(&format!("{name}=")))
}

/// A movie of `owner`'s, published with one verified copy on `utah`.
async fn published_movie(f: &Fixture, id: &str, owner: i64, price: i64) {
    f.db.insert_asset(id, owner, "A movie", "m.mp4", 10)
        .await
        .unwrap();
    f.db.record_sealed(
        id,
        "seed",
        &"ab".repeat(32),
        100,
        90,
        b"k",
        &["utah".into()],
    )
    .await
    .unwrap();
    f.db.replica_verified(id, "utah").await.unwrap();
    assert!(f.db.publish_if_replicated(id, 1).await.unwrap());
    f.db.set_price(id, price).await.unwrap();
}

async fn account_id(f: &Fixture, email: &str) -> i64 {
    f.db.user_by_email(email).await.unwrap().unwrap().id
}

#[tokio::test]
async fn signing_up_needs_the_form_token_then_the_session_needs_csrf_to_write() {
    let f = fixture().await;
    let (s, h, _) = send(&f, Request::get("/signup").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let csrf_cookie = set_cookie(&h, "slm_login_csrf").expect("a form token cookie");
    let token = csrf_cookie.split_once('=').unwrap().1.to_string();
    let signup = |csrf: &str| {
        Request::post("/signup")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, &csrf_cookie)
            .body(Body::from(format!(
                "csrf={csrf}&email=new%40example.com&password=correct-horse-battery"
            )))
            .unwrap()
    };
    let (s, _, body) = send(&f, signup("forged")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(body.contains("csrf_failed"), "{body}");
    assert!(
        f.db.user_by_email("new@example.com")
            .await
            .unwrap()
            .is_none(),
        "nothing created by a forged form"
    );
    let (s, h, _) = send(&f, signup(&token)).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let session = set_cookie(&h, "slm_session").expect("logged in");

    // Reading needs only the cookie; the account is an uploader's with
    // the signup bonus, once in the books.
    let (s, _, body) = send(
        &f,
        Request::get("/api/v1/account")
            .header(header::COOKIE, &session)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v = json(&body);
    assert_eq!(v["account"]["role"], "uploader");
    assert_eq!(v["balance"], 1000);
    assert_eq!(v["ledger"][0]["kind"], "signup_bonus");
    // Writing with only the cookie (what a forged cross-site request
    // carries) is refused.
    let (s, _, body) = send(
        &f,
        Request::post("/api/v1/assets/x/purchase")
            .header(header::COOKIE, &session)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"request_id":"1"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::FORBIDDEN, "csrf_failed")
    );
}

#[tokio::test]
async fn the_json_api_keeps_each_uploader_to_their_own_movies() {
    let f = fixture().await;
    let alice = token_for(&f, "alice@example.com", "uploader").await;
    let bob = token_for(&f, "bob@example.com", "uploader").await;
    let a = account_id(&f, "alice@example.com").await;
    f.db.insert_asset("queued1", a, "Private", "p.mp4", 10)
        .await
        .unwrap();
    let get = |path: &str, t: &str| api("GET", path, t, serde_json::Value::Null);
    let (s, _, body) = send(&f, get("/api/v1/assets/queued1", &alice)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["state"], "queued");
    // Someone else's unpublished movie does not exist for Bob, to read or
    // to cancel; an unknown id answers the same.
    for (method, path) in [
        ("GET", "/api/v1/assets/queued1"),
        ("POST", "/api/v1/assets/queued1/cancel"),
        ("GET", "/api/v1/assets/nope"),
    ] {
        let (s, _, body) = send(&f, api(method, path, &bob, serde_json::json!({}))).await;
        assert_eq!(
            (s, code(&body).as_str()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{method} {path}"
        );
    }
    let (s, _, body) = send(&f, get("/api/v1/assets", &bob)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!body.contains("queued1"), "{body}");
    // Retrying is for operators.
    let (s, _, body) = send(
        &f,
        api(
            "POST",
            "/api/v1/assets/queued1/retry",
            &alice,
            serde_json::json!({}),
        ),
    )
    .await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    // The owner cancels it before it starts; then it is too late to again.
    let cancel = || {
        api(
            "POST",
            "/api/v1/assets/queued1/cancel",
            &alice,
            serde_json::json!({}),
        )
    };
    let (s, _, body) = send(&f, cancel()).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["state"], "rejected");
    let (s, _, body) = send(&f, cancel()).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::CONFLICT, "not_cancellable")
    );
}

#[tokio::test]
async fn purchases_charge_once_and_refuse_with_stable_codes() {
    let f = fixture().await;
    let buyer = token_for(&f, "buyer@example.com", "uploader").await;
    let _ = token_for(&f, "seller@example.com", "uploader").await;
    let b = account_id(&f, "buyer@example.com").await;
    let s_id = account_id(&f, "seller@example.com").await;
    f.db.grant_credits(&manager::catalog::GrantOrder {
        to: &manager::catalog::Recipients::Account(b),
        amount: 50,
        actor: "test",
        reason: "test",
        key: "k",
    })
    .await
    .unwrap();
    published_movie(&f, "paid1", s_id, 10).await;
    f.db.insert_asset("queued1", s_id, "Not yet", "m.mp4", 10)
        .await
        .unwrap();
    let buy = |id: &str, request_id: &str| {
        api(
            "POST",
            &format!("/api/v1/assets/{id}/purchase"),
            &buyer,
            serde_json::json!({ "request_id": request_id }),
        )
    };
    for (id, request_id, status, expected) in [
        ("paid1", "", StatusCode::BAD_REQUEST, "request_id_invalid"),
        (
            "paid1",
            "a b",
            StatusCode::BAD_REQUEST,
            "request_id_invalid",
        ),
        ("nope", "r1", StatusCode::NOT_FOUND, "not_found"),
        ("queued1", "r2", StatusCode::NOT_FOUND, "not_published"),
    ] {
        let (s, _, body) = send(&f, buy(id, request_id)).await;
        assert_eq!(
            (s, code(&body).as_str()),
            (status, expected),
            "{id} {request_id:?}"
        );
    }
    assert_eq!(f.db.balance(b).await.unwrap(), 50, "nothing charged");
    // Nodes count as up until the monitor's first probe says otherwise,
    // so this purchase goes through: charged once, however often retried.
    let (s, _, body) = send(&f, buy("paid1", "r3")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let first = json(&body);
    assert_eq!(
        (&first["charged_now"], &first["price"], &first["balance"]),
        (
            &serde_json::json!(true),
            &serde_json::json!(10),
            &serde_json::json!(40)
        )
    );
    let grant = first["grant_id"].as_str().unwrap().to_string();
    let url = first["media_url"].as_str().unwrap();
    assert!(
        url.starts_with("http://manager.test/media/") && url.ends_with("/paid1.mp4"),
        "{first}"
    );
    let (s, _, body) = send(&f, buy("paid1", "r3")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let again = json(&body);
    assert_eq!(again["charged_now"], false);
    assert_eq!(again["grant_id"], grant.as_str());
    assert_eq!(again["balance"], 40);
    // The same request id for another movie is another purchase: refused.
    published_movie(&f, "paid2", s_id, 45).await;
    let (s, _, body) = send(&f, buy("paid2", "r3")).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::CONFLICT, "request_id_reused")
    );
    let (s, _, body) = send(&f, buy("paid2", "r4")).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::PAYMENT_REQUIRED, "insufficient_credits")
    );
    assert_eq!(f.db.balance(b).await.unwrap(), 40);
    assert_eq!(f.db.balance(s_id).await.unwrap(), 7, "the 70 % share, once");
    assert!(f.db.verify_balances().await.unwrap().is_empty());
}

#[tokio::test]
async fn operator_grants_need_an_operator_a_reason_and_credit_once_per_key() {
    let f = fixture().await;
    let uploader = token_for(&f, "u@example.com", "uploader").await;
    let operator = token_for(&f, "o@example.com", "operator").await;
    let u = account_id(&f, "u@example.com").await;
    let grant = |t: &str, body: serde_json::Value| api("POST", "/api/v1/admin/grants", t, body);
    let good = serde_json::json!({
        "email": "u@example.com", "amount": 25, "reason": "outage on Monday", "key": "mon"
    });
    let (s, _, body) = send(&f, grant(&uploader, good.clone())).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    for (body, expected) in [
        (
            serde_json::json!({"email": "u@example.com", "amount": 0, "reason": "x", "key": "a"}),
            "amount_invalid",
        ),
        (
            serde_json::json!({"email": "u@example.com", "amount": 5, "reason": " ", "key": "b"}),
            "reason_missing",
        ),
        (
            serde_json::json!({"amount": 5, "reason": "x", "key": "c"}),
            "rule_invalid",
        ),
    ] {
        let (s, _, answer) = send(&f, grant(&operator, body.clone())).await;
        assert_eq!(
            (s, code(&answer).as_str()),
            (StatusCode::BAD_REQUEST, expected),
            "{body}"
        );
    }
    let (s, _, body) = send(&f, grant(&operator, good.clone())).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["granted"], 1);
    let (s, _, body) = send(&f, grant(&operator, good)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["granted"], 0, "the same key credits once");
    assert_eq!(f.db.balance(u).await.unwrap(), 25);
    let h = f.db.history(u, 1).await.unwrap();
    assert_eq!(h[0].reason, "outage on Monday");
    assert!(h[0].actor.starts_with("operator:"), "{}", h[0].actor);
}

/// A logged-in browser session for a new account with `role`: its
/// cookie and CSRF token.
async fn session_for(f: &Fixture, email: &str, role: &str) -> (String, String) {
    let id =
        f.db.create_account(email, "x", role.parse().unwrap(), 0)
            .await
            .unwrap();
    let token = manager::auth::random_token();
    let csrf = manager::auth::random_token();
    f.db.insert_session(
        &manager::auth::token_hash(&token),
        id,
        &csrf,
        manager::catalog::now() + 3600,
    )
    .await
    .unwrap();
    (format!("slm_session={token}"), csrf)
}

/// An operator's session (cookie, CSRF token) and an uploader's account id.
async fn operator_and_uploader(f: &Fixture) -> (String, String, i64) {
    let (op, csrf) = session_for(f, "op@example.com", "operator").await;
    session_for(f, "u@example.com", "uploader").await;
    let u = f.db.user_by_email("u@example.com").await.unwrap().unwrap();
    (op, csrf, u.id)
}

fn page(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut r = Request::get(path);
    if let Some(c) = cookie {
        r = r.header(header::COOKIE, c);
    }
    r.body(Body::empty()).unwrap()
}

fn form(path: &str, cookie: Option<&str>, body: &str) -> Request<Body> {
    let mut r =
        Request::post(path).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        r = r.header(header::COOKIE, c);
    }
    r.body(Body::from(body.to_string())).unwrap()
}

/// Every admin route, as a request a given caller would send.
fn admin_routes(cookie: Option<&str>, csrf: &str) -> Vec<Request<Body>> {
    vec![
        page("/admin", cookie),
        page("/admin/accounts?q=a", cookie),
        page("/admin/audit", cookie),
        page("/admin/jobs", cookie),
        form("/admin/jobs/j1/cancel", cookie, &format!("csrf={csrf}")),
        form(
            "/admin/accounts/grant",
            cookie,
            &format!("csrf={csrf}&email=u%40example.com&created_before=&amount=5&reason=x&key=k"),
        ),
        page("/admin/alerts", cookie),
        form(
            "/admin/alerts/test",
            cookie,
            &format!("csrf={csrf}&channel=email"),
        ),
        page("/admin/incidents", cookie),
        form(
            "/admin/incidents",
            cookie,
            &format!("csrf={csrf}&title=t&impact=minor&component=web&body=b"),
        ),
        form(
            "/admin/incidents/1/update",
            cookie,
            &format!("csrf={csrf}&status=resolved&body=b"),
        ),
        page("/admin/nodes", cookie),
        form("/admin/nodes/utah/drain", cookie, &format!("csrf={csrf}")),
        form("/admin/jobs/j1/raise", cookie, &format!("csrf={csrf}")),
        page("/admin/movies?q=m", cookie),
        page("/admin/movies/m1", cookie),
        form(
            "/admin/movies/m1/withdraw",
            cookie,
            &format!("csrf={csrf}&reason=x"),
        ),
        form("/admin/movies/m1/repair", cookie, &format!("csrf={csrf}")),
        form("/admin/movies/m1/reverify", cookie, &format!("csrf={csrf}")),
        page("/admin/accounts/1", cookie),
        form("/admin/accounts/1/disable", cookie, &format!("csrf={csrf}")),
        page("/admin/backups", cookie),
        form("/admin/backups/now", cookie, &format!("csrf={csrf}")),
        form("/admin/backups/verify", cookie, &format!("csrf={csrf}")),
    ]
}

#[tokio::test]
async fn the_admin_area_is_for_operators_only_route_by_route() {
    let f = fixture().await;
    let (uploader, uploader_csrf) = session_for(&f, "u@example.com", "uploader").await;
    let u =
        f.db.user_by_email("u@example.com")
            .await
            .unwrap()
            .unwrap()
            .id;
    f.db.insert_asset("j1", u, "Mine", "m.mp4", 1)
        .await
        .unwrap();
    published_movie(&f, "m1", u, 0).await;
    for r in admin_routes(None, "x") {
        let path = r.uri().to_string();
        let (s, h, _) = send(&f, r).await;
        assert_eq!(s, StatusCode::SEE_OTHER, "{path}: log in first");
        assert_eq!(h[header::LOCATION], "/login", "{path}");
    }
    for r in admin_routes(Some(&uploader), &uploader_csrf) {
        let path = r.uri().to_string();
        let (s, _, body) = send(&f, r).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {body}");
        assert!(!body.contains("Is everything fine"), "{path}");
    }
    assert_eq!(
        f.db.balance(
            f.db.user_by_email("u@example.com")
                .await
                .unwrap()
                .unwrap()
                .id
        )
        .await
        .unwrap(),
        0,
        "nothing granted by a non-operator"
    );
    assert!(f.db.audit_entries(10).await.unwrap().is_empty());
    assert_eq!(
        f.db.asset("j1").await.unwrap().unwrap().state,
        manager::domain::AssetState::Queued,
        "not cancelled through the admin by a non-operator"
    );
    assert!(
        f.db.incidents(0).await.unwrap().is_empty(),
        "no incident opened"
    );
    assert!(
        f.db.drained_nodes().await.unwrap().is_empty(),
        "no node drained"
    );
    assert_eq!(
        f.db.asset("m1").await.unwrap().unwrap().state,
        manager::domain::AssetState::Published,
        "not withdrawn by a non-operator"
    );
    assert!(
        f.db.account(u)
            .await
            .unwrap()
            .unwrap()
            .disabled_at
            .is_none(),
        "not disabled by a non-operator"
    );
    assert_eq!(
        f.db.jobs(10).await.unwrap()[0].priority,
        0,
        "not moved ahead by a non-operator"
    );
    // The JSON side: 401 without credentials; the checks are the operators'.
    let (s, _, _) = send(&f, page("/api/v1/admin/checks", None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = send(&f, page("/api/v1/admin/checks", Some(&uploader))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn incidents_and_drains_reach_the_status_page_and_the_audit_log() {
    let f = fixture().await;
    let (op, csrf) = session_for(&f, "op@example.com", "operator").await;
    // The public page before anything: every component operational.
    let (s, h, body) = send(&f, page("/status", None)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("All systems operational"), "{body}");
    for c in [
        "web",
        "playback:utah",
        "playback:toronto",
        "transcoding",
        "backups",
    ] {
        assert!(
            body.contains(&format!("data-component=\"{c}\"")),
            "{c}: {body}"
        );
    }
    let etag = h[header::ETAG].to_str().unwrap().to_string();
    let again = Request::get("/status")
        .header(header::IF_NONE_MATCH, &etag)
        .body(Body::empty())
        .unwrap();
    let (s, _, _) = send(&f, again).await;
    assert_eq!(s, StatusCode::NOT_MODIFIED, "the same page, the same tag");

    // A forged token changes nothing; a bad form is refused with a reason.
    let (s, _, _) = send(
        &f,
        form(
            "/admin/incidents",
            Some(&op),
            "csrf=forged&title=t&impact=minor&component=web&body=b",
        ),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, body) = send(
        &f,
        form(
            "/admin/incidents",
            Some(&op),
            &format!("csrf={csrf}&title=t&impact=minor&component=moon&body=b"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("component"), "{body}");
    assert!(f.db.incidents(0).await.unwrap().is_empty());

    // An incident: on the page (the component degraded, the title shown,
    // escaped), in both feeds, then resolved with a closing note.
    let (s, _, body) = send(
        &f,
        form(
            "/admin/incidents",
            Some(&op),
            &format!("csrf={csrf}&title=Slow+%3Cb%3Eplayback%3C%2Fb%3E&impact=minor&component=playback%3Autah&body=We+are+looking"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, _, body) = send(&f, page("/status", None)).await;
    assert!(
        body.contains("Slow &lt;b&gt;playback&lt;/b&gt;"),
        "escaped: {body}"
    );
    assert!(body.contains("We are looking"));
    assert!(
        body.contains("data-component=\"playback:utah\" data-state=\"degraded\""),
        "{body}"
    );
    let (_, h, atom) = send(&f, page("/status/feed.atom", None)).await;
    assert_eq!(
        h[header::CONTENT_TYPE],
        "application/atom+xml; charset=utf-8"
    );
    assert!(
        atom.contains("<title>Slow &lt;b&gt;playback&lt;/b&gt; (investigating)</title>"),
        "{atom}"
    );
    let (_, _, json) = send(&f, page("/status/feed.json", None)).await;
    let feed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(feed["version"], "https://jsonfeed.org/version/1.1");
    assert_eq!(
        feed["items"][0]["title"],
        "Slow <b>playback</b> (investigating)"
    );
    let (_, h, badge) = send(&f, page("/status/badge.svg", None)).await;
    assert_eq!(h[header::CONTENT_TYPE], "image/svg+xml");
    assert!(badge.contains("degraded"), "{badge}");
    let id = f.db.incidents(0).await.unwrap()[0].id;
    let (s, _, _) = send(
        &f,
        form(
            &format!("/admin/incidents/{id}/update"),
            Some(&op),
            &format!("csrf={csrf}&status=resolved&body=Fixed"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, body) = send(&f, page("/status", None)).await;
    assert!(
        body.contains("All systems operational") && body.contains("Fixed"),
        "{body}"
    );
    let (s, _, _) = send(
        &f,
        form(
            &format!("/admin/incidents/{id}/update"),
            Some(&op),
            &format!("csrf={csrf}&status=monitoring&body=Again"),
        ),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "a closed incident takes no update"
    );

    // Drain and return a node; an unknown node is refused.
    let (s, _, body) = send(
        &f,
        form(
            "/admin/nodes/utah/drain",
            Some(&op),
            &format!("csrf={csrf}"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(
        body.contains("data-node=\"utah\" data-state=\"not probed yet\" data-drained=\"true\""),
        "{body}"
    );
    assert_eq!(
        f.db.drained_nodes().await.unwrap(),
        vec!["utah".to_string()]
    );
    let (s, _, _) = send(
        &f,
        form(
            "/admin/nodes/moon/drain",
            Some(&op),
            &format!("csrf={csrf}"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, _, body) = send(
        &f,
        form(
            "/admin/nodes/utah/return",
            Some(&op),
            &format!("csrf={csrf}"),
        ),
    )
    .await;
    assert!(body.contains("data-drained=\"false\""), "{body}");
    assert!(f.db.drained_nodes().await.unwrap().is_empty());
    let log: Vec<(String, String)> =
        f.db.audit_entries(10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.action, e.target))
            .collect();
    for want in [
        ("incident_open", format!("incident:{id}")),
        ("incident_update", format!("incident:{id}")),
        ("node_drain", "node:utah".to_string()),
        ("node_drain", "node:moon".to_string()),
        ("node_return", "node:utah".to_string()),
    ] {
        assert!(
            log.contains(&(want.0.to_string(), want.1.clone())),
            "{want:?} in {log:?}"
        );
    }
}

#[tokio::test]
async fn the_overview_answers_is_everything_fine_for_an_operator() {
    let f = fixture().await;
    let (op, _) = session_for(&f, "op@example.com", "operator").await;
    let (s, h, body) = send(&f, page("/admin", Some(&op))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
    for expected in [
        "Is everything fine?",
        "id=\"components\"",
        "data-node=\"utah\"",
        "data-node=\"toronto\"",
        "not probed yet",
        // A fresh site has never been backed up: the overview says so.
        "there is no local backup",
        "Every balance equals its ledger sum.",
        "id=\"workers\"",
    ] {
        assert!(
            body.contains(expected),
            "{expected:?} missing from the overview"
        );
    }
    // A damaged movie is counted and named as a problem.
    let owner =
        f.db.user_by_email("op@example.com")
            .await
            .unwrap()
            .unwrap()
            .id;
    f.db.insert_asset("d", owner, "D", "d.mp4", 1)
        .await
        .unwrap();
    f.db.record_sealed("d", "seed", &"cd".repeat(32), 10, 9, b"k", &["utah".into()])
        .await
        .unwrap();
    assert!(f.db.mark_damaged("d").await.unwrap());
    let (_, _, body) = send(&f, page("/admin", Some(&op))).await;
    assert!(body.contains("1 movie(s) damaged"), "{body}");
}

#[tokio::test]
async fn an_operator_grants_credits_from_the_admin_and_the_audit_log_keeps_it() {
    let f = fixture().await;
    let (op, csrf, u) = operator_and_uploader(&f).await;
    let grant = |csrf: &str, amount: &str, key: &str| {
        form(
            "/admin/accounts/grant",
            Some(&op),
            &format!(
                "csrf={csrf}&email=u%40example.com&created_before=&amount={amount}&reason=outage+on+Monday&key={key}"
            ),
        )
    };
    let (s, _, body) = send(&f, grant("forged", "25", "k1")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("csrf_failed"));
    assert_eq!(f.db.balance(u).await.unwrap(), 0);

    let (s, _, body) = send(&f, grant(&csrf, "0", "k1")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains("amount_invalid"), "{body}");

    let (s, _, body) = send(&f, grant(&csrf, "25", "k1")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(
        body.contains("25 credits granted to 1 account(s)."),
        "{body}"
    );
    // The form sent twice (a double click, a reload) grants once.
    let (_, _, body) = send(&f, grant(&csrf, "25", "k1")).await;
    assert!(body.contains("granted to 0 account(s)"), "{body}");
    assert_eq!(f.db.balance(u).await.unwrap(), 25);

    let (s, _, body) = send(&f, page("/admin/accounts?q=U%40EXAMPLE", Some(&op))).await;
    assert_eq!(s, StatusCode::OK);
    let table = body
        .split("id=\"accounts\"")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_else(|| panic!("{body}"));
    assert!(
        table.contains("u@example.com") && table.contains(">25<"),
        "{table}"
    );
    assert!(!table.contains("op@example.com"), "the search narrows");

    let log = f.db.audit_entries(10).await.unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        (
            log[1].actor.as_str(),
            log[1].action.as_str(),
            log[1].target.as_str()
        ),
        ("op@example.com", "grant_credits", &*format!("account:{u}"))
    );
    assert!(log[1].detail.contains("amount=25") && log[1].detail.contains("outage on Monday"));
    assert!(
        log[0].detail.contains("credited 0 account(s)"),
        "{}",
        log[0].detail
    );
    let (s, _, body) = send(&f, page("/admin/audit", Some(&op))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        body.contains("grant_credits") && body.contains("op@example.com"),
        "{body}"
    );
}

#[tokio::test]
async fn the_job_queue_shows_jobs_and_its_actions_are_audited() {
    let f = fixture().await;
    let (op, csrf, u) = operator_and_uploader(&f).await;
    f.db.insert_asset("waiting", u, "Waiting", "w.mp4", 1)
        .await
        .unwrap();
    f.db.insert_asset("broken", u, "Broken", "b.mp4", 1)
        .await
        .unwrap();
    f.db.reject("broken", "seed", "processing_failed", "the encoder crashed")
        .await
        .unwrap();
    let (s, _, body) = send(&f, page("/admin/jobs", Some(&op))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    for expected in [
        "data-job=\"waiting\"",
        "data-job=\"broken\"",
        "processing_failed: the encoder crashed",
        "/admin/jobs/broken/retry",
        "/admin/jobs/waiting/cancel",
        "u@example.com",
    ] {
        assert!(body.contains(expected), "{expected:?} missing: {body}");
    }
    let act = |path: &str, csrf: &str| form(path, Some(&op), &format!("csrf={csrf}"));
    let (s, _, _) = send(&f, act("/admin/jobs/waiting/cancel", "forged")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        f.db.asset("waiting").await.unwrap().unwrap().state,
        manager::domain::AssetState::Queued
    );
    let (s, _, body) = send(&f, act("/admin/jobs/waiting/cancel", &csrf)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        f.db.asset("waiting")
            .await
            .unwrap()
            .unwrap()
            .error_code
            .as_deref(),
        Some("cancelled")
    );
    // Its source was never kept here: the retry is refused, and says why.
    let (s, _, body) = send(&f, act("/admin/jobs/broken/retry", &csrf)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("source_gone"), "{body}");
    let (s, _, _) = send(&f, act("/admin/jobs/broken/explode", &csrf)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let log = f.db.audit_entries(10).await.unwrap();
    assert_eq!(
        log.iter()
            .map(|e| (e.action.as_str(), e.target.as_str(), e.detail.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("job_retry", "movie:broken", "refused: source_gone"),
            ("job_cancel", "movie:waiting", "done"),
        ]
    );
}

#[tokio::test]
async fn movies_are_found_withdrawn_reinstated_and_repaired_from_the_admin() {
    let f = fixture().await;
    let (op, csrf, u) = operator_and_uploader(&f).await;
    published_movie(&f, "m1", u, 0).await;
    f.db.insert_asset("other", u, "Something else", "o.mp4", 1)
        .await
        .unwrap();
    // Search by title, owner and id; filter by state and by missing copies
    // (one verified copy of the two the site wants).
    let listed = |body: &str, id: &str| body.contains(&format!("data-movie=\"{id}\""));
    let (s, _, body) = send(&f, page("/admin/movies?q=a+MOVIE", Some(&op))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(listed(&body, "m1") && !listed(&body, "other"), "{body}");
    let (_, _, body) = send(&f, page("/admin/movies?q=u%40example", Some(&op))).await;
    assert!(listed(&body, "m1") && listed(&body, "other"), "{body}");
    let (_, _, body) = send(&f, page("/admin/movies?q=other", Some(&op))).await;
    assert!(!listed(&body, "m1") && listed(&body, "other"), "{body}");
    let (_, _, body) = send(&f, page("/admin/movies?state=queued", Some(&op))).await;
    assert!(!listed(&body, "m1") && listed(&body, "other"), "{body}");
    let (_, _, body) = send(&f, page("/admin/movies?only=under_replicated", Some(&op))).await;
    assert!(listed(&body, "m1") && !listed(&body, "other"), "{body}");
    assert!(body.contains("1 of 1 verified"), "{body}");
    // Every copy with its state and proof time.
    let (s, _, body) = send(&f, page("/admin/movies/m1", Some(&op))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains("data-node=\"utah\""), "{body}");
    assert!(!body.contains(">never<"), "utah's copy was proven: {body}");
    let (s, _, _) = send(&f, page("/admin/movies/nope", Some(&op))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let act = |path: &str, body: &str| form(path, Some(&op), body);
    // Withdrawing needs CSRF and a reason.
    let (s, _, _) = send(&f, act("/admin/movies/m1/withdraw", "csrf=forged&reason=x")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, body) = send(
        &f,
        act(
            "/admin/movies/m1/withdraw",
            &format!("csrf={csrf}&reason=+"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("a reason of 1 to 500 characters"), "{body}");
    let (s, _, _) = send(
        &f,
        act(
            "/admin/movies/other/withdraw",
            &format!("csrf={csrf}&reason=x"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "a job is cancelled, not withdrawn");
    // A media URL handed out before: redirected now, refused after.
    let a = f.db.asset("m1").await.unwrap().unwrap();
    let url = f
        .minter
        .media_url_until(&a, None, shared::runtime::unix_now() + 600)
        .unwrap();
    let path = url.trim_start_matches("http://manager.test");
    let (s, _, _) = send(&f, page(path, None)).await;
    assert_eq!(s, StatusCode::FOUND, "playable before");
    let (s, _, body) = send(
        &f,
        act(
            "/admin/movies/m1/withdraw",
            &format!("csrf={csrf}&reason=a+complaint+about+its+music"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains("data-state=\"withdrawn\""), "{body}");
    assert!(body.contains("a complaint about its music"), "{body}");
    assert_eq!(
        f.db.asset("m1").await.unwrap().unwrap().state,
        manager::domain::AssetState::Withdrawn
    );
    let (s, _, _) = send(&f, page(path, None)).await;
    assert_ne!(s, StatusCode::FOUND, "the media URL stops at once");
    let (s, _, _) = send(&f, page("/assets/m1", None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "its public page is gone");
    let (_, _, body) = send(&f, page("/", None)).await;
    assert!(!body.contains("/assets/m1"), "not listed: {body}");
    let buyer = token_for(&f, "b@example.com", "uploader").await;
    let (s, _, body) = send(
        &f,
        api(
            "POST",
            "/api/v1/assets/m1/purchase",
            &buyer,
            serde_json::json!({"request_id": "r1"}),
        ),
    )
    .await;
    assert_eq!(code(&body), "not_published", "{s} {body}");
    // Lost copies change nothing of that; reinstating brings it back.
    let (s, _, _) = send(
        &f,
        act(
            "/admin/movies/m1/withdraw",
            &format!("csrf={csrf}&reason=x"),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "already withdrawn");
    let (s, _, body) = send(
        &f,
        act("/admin/movies/m1/reinstate", &format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        f.db.asset("m1").await.unwrap().unwrap().state,
        manager::domain::AssetState::Published
    );
    let (s, _, _) = send(&f, page(path, None)).await;
    assert_eq!(s, StatusCode::FOUND, "playable again");

    // Repair now: a copy waiting out its back-off is due at once.
    f.db.replica_failed("m1", "utah", "boom", shared::runtime::unix_now() + 3600)
        .await
        .unwrap();
    let (s, _, body) = send(&f, act("/admin/movies/m1/repair", &format!("csrf={csrf}"))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains("1 waiting copies are due now"), "{body}");
    // Re-verify asks each node; this one is unreachable, and says so.
    let (s, _, body) = send(
        &f,
        act("/admin/movies/m1/reverify", &format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(
        body.contains("utah: not checked: node unreachable"),
        "{body}"
    );
    let (s, _, _) = send(&f, act("/admin/movies/m1/explode", &format!("csrf={csrf}"))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let log = f.db.audit_entries(20).await.unwrap();
    let mut seen: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (e.action.as_str(), e.detail.as_str()))
        .collect();
    seen.reverse();
    assert_eq!(
        seen[..6].iter().map(|x| x.0).collect::<Vec<_>>(),
        [
            "movie_withdraw",
            "movie_withdraw",
            "movie_withdraw",
            "movie_withdraw",
            "movie_reinstate",
            "movie_repair"
        ],
        "{seen:?}"
    );
    assert!(seen[0].1.starts_with("refused: a reason"), "{seen:?}");
    assert!(
        seen[2].1.contains("a complaint about its music"),
        "{seen:?}"
    );
    assert_eq!(seen[6].0, "movie_reverify");
}

#[tokio::test]
async fn a_disabled_account_is_locked_out_at_once_and_its_page_shows_its_ledger() {
    let f = fixture().await;
    let (op, csrf) = session_for(&f, "op@example.com", "operator").await;
    let (u_cookie, _) = session_for(&f, "u@example.com", "uploader").await;
    let u = account_id(&f, "u@example.com").await;
    let token = token_for(&f, "t@example.com", "uploader").await;
    let t = account_id(&f, "t@example.com").await;
    let op_id = account_id(&f, "op@example.com").await;
    manager::ledger::grant(
        &*f.db,
        &manager::ledger::Recipients::Account(u),
        manager::domain::Credits::new(7).unwrap(),
        "operator:op@example.com",
        "welcome back",
        "k1",
    )
    .await
    .unwrap();
    let (s, _, body) = send(&f, page(&format!("/admin/accounts/{u}"), Some(&op))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    for expected in [
        "7 credits",
        "equals its ledger",
        "welcome back",
        "data-disabled=\"false\"",
    ] {
        assert!(body.contains(expected), "{expected:?}: {body}");
    }
    let act = |path: String, csrf: &str| form(&path, Some(&op), &format!("csrf={csrf}"));
    let (s, _, _) = send(&f, act(format!("/admin/accounts/{u}/disable"), "forged")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = send(&f, page("/account", Some(&u_cookie))).await;
    assert_eq!(s, StatusCode::OK, "still in");
    for id in [u, t] {
        let (s, _, body) = send(&f, act(format!("/admin/accounts/{id}/disable"), &csrf)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert!(body.contains("data-disabled=\"true\""), "{body}");
    }
    // Its session and its API token stop at once; log-in is refused with
    // its own word once the password is right.
    let (s, _, _) = send(&f, page("/account", Some(&u_cookie))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "as if never logged in");
    let (s, _, _) = send(
        &f,
        api("GET", "/api/v1/account", &token, serde_json::json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let hash = manager::auth::hash_password("correct horse").unwrap();
    f.db.set_password("u@example.com", &hash).await.unwrap();
    let (s, h, _) = send(&f, page("/login", None)).await;
    assert_eq!(s, StatusCode::OK);
    let login_csrf = set_cookie(&h, "slm_login_csrf").unwrap();
    let login_csrf = login_csrf.split_once('=').unwrap().1.to_string();
    let try_login = |password: &str| {
        Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, format!("slm_login_csrf={login_csrf}"))
            .body(Body::from(format!(
                "csrf={login_csrf}&email=u%40example.com&password={password}"
            )))
            .unwrap()
    };
    let (s, _, body) = send(&f, try_login("wrong")).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "a wrong password learns nothing: {body}"
    );
    assert!(!body.contains("account_disabled"));
    let (s, h, body) = send(&f, try_login("correct+horse")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("account_disabled"), "{body}");
    assert!(set_cookie(&h, "slm_session").is_none(), "no session");
    // Refusals: twice, oneself, nobody.
    let (s, _, body) = send(&f, act(format!("/admin/accounts/{u}/disable"), &csrf)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let (s, _, body) = send(&f, act(format!("/admin/accounts/{op_id}/disable"), &csrf)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("your own account"), "{body}");
    let (s, _, _) = send(&f, act("/admin/accounts/999999/disable".into(), &csrf)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Enabled again: its token works again; its ledger was never touched.
    let (s, _, _) = send(&f, act(format!("/admin/accounts/{t}/enable"), &csrf)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(
        &f,
        api("GET", "/api/v1/account", &token, serde_json::json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(f.db.balance(u).await.unwrap(), 7);
    let (_, _, body) = send(&f, page("/admin/accounts?q=u%40", Some(&op))).await;
    assert!(
        body.contains("disabled</span>"),
        "the list marks it: {body}"
    );
    let log = audit_lines(&f, 20).await;
    assert_eq!(log.len(), 6, "{log:?}");
    assert!(
        log[0].starts_with(&format!("account_disable account:{u} done")),
        "{log:?}"
    );
    assert!(
        log[2].contains("refused: u@example.com is already disabled"),
        "{log:?}"
    );
    assert!(
        log[3].contains("refused: you cannot disable your own account"),
        "{log:?}"
    );
    assert!(log[4].contains("refused: no account 999999"), "{log:?}");
    assert!(
        log[5].starts_with(&format!("account_enable account:{t} done")),
        "{log:?}"
    );
}

#[tokio::test]
async fn a_queued_job_moves_ahead_and_the_queue_names_its_worker() {
    let f = fixture().await;
    let (op, csrf, u) = operator_and_uploader(&f).await;
    for id in ["first", "second", "third"] {
        f.db.insert_asset(id, u, id, "m.mp4", 1).await.unwrap();
    }
    let act = |path: &str| form(path, Some(&op), &format!("csrf={csrf}"));
    let (s, _, body) = send(&f, act("/admin/jobs/third/raise")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains("third is next in the queue"), "{body}");
    let order: Vec<String> =
        f.db.jobs(10)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
    assert_eq!(order, ["third", "first", "second"]);
    let claimed =
        f.db.claim_next(30, "host/transcode-1")
            .await
            .unwrap()
            .unwrap();
    assert_eq!(claimed.id, "third", "claimed first");
    let (_, _, body) = send(&f, page("/admin/jobs", Some(&op))).await;
    assert!(body.contains("host/transcode-1"), "{body}");
    // A job already in a step is not moved; nor is a movie that is no job.
    let (s, _, body) = send(&f, act("/admin/jobs/third/raise")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("only a queued job"), "{body}");
    let (s, _, _) = send(&f, act("/admin/jobs/second/raise")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(&f, act("/admin/jobs/nope/raise")).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let order: Vec<String> =
        f.db.jobs(10)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
    assert_eq!(
        order,
        ["second", "third", "first"],
        "the latest raised goes first"
    );
    assert_eq!(
        f.db.claim_next(30, "w").await.unwrap().unwrap().id,
        "second"
    );
    let log = audit_lines(&f, 10).await;
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(
        log[0].starts_with("job_raise movie:third priority"),
        "{log:?}"
    );
    assert!(log[1].contains("refused"), "{log:?}");
}

#[tokio::test]
async fn backups_are_listed_taken_and_verified_from_the_admin() {
    let f = fixture().await;
    let (op, csrf) = session_for(&f, "op@example.com", "operator").await;
    let (s, _, body) = send(&f, page("/admin/backups", Some(&op))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains("There is no local backup"), "{body}");
    assert!(body.contains("manager backup restore"), "{body}");
    assert!(
        body.contains("backup.recovery_key"),
        "no key configured: {body}"
    );
    let act = |path: &str, csrf: &str| form(path, Some(&op), &format!("csrf={csrf}"));
    let (s, _, _) = send(&f, act("/admin/backups/now", "forged")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, body) = send(&f, act("/admin/backups/now", &csrf)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains("A backup started"), "{body}");
    // It runs in the background; the page follows it.
    let mut body = String::new();
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        body = send(&f, page("/admin/backups", Some(&op))).await.2;
        if body.contains("data-done=\"true\"") {
            break;
        }
    }
    assert!(
        body.contains("data-done=\"true\" data-ok=\"true\""),
        "{body}"
    );
    assert!(body.contains("taken and verified"), "{body}");
    assert!(!body.contains("There is no local backup"), "{body}");
    assert!(
        body.contains("when taken"),
        "verified when it was taken: {body}"
    );
    let (s, _, answer) = send(&f, act("/admin/backups/verify", &csrf)).await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        body = send(&f, page("/admin/backups", Some(&op))).await.2;
        if body.contains("data-done=\"true\"") {
            break;
        }
    }
    assert!(body.contains("OK local"), "{body}");
    assert!(body.contains(" ago</td>"), "verified just now: {body}");
    assert!(!body.contains("when taken"), "{body}");
    let (s, _, _) = send(&f, act("/admin/backups/explode", &csrf)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let log: Vec<String> =
        f.db.audit_entries(10)
            .await
            .unwrap()
            .iter()
            .rev()
            .map(|e| format!("{} {}", e.action, e.detail))
            .collect();
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!(log[0], "backup_now started");
    assert!(
        log[1].starts_with("backup_now_finished done: backup "),
        "{log:?}"
    );
    assert_eq!(log[2], "backup_verify started");
    assert!(
        log[3].starts_with("backup_verify_finished done: OK local"),
        "{log:?}"
    );
}

/// The newest `limit` audit entries, oldest first, as "action target detail".
async fn audit_lines(f: &Fixture, limit: i64) -> Vec<String> {
    f.db.audit_entries(limit)
        .await
        .unwrap()
        .iter()
        .rev()
        .map(|e| format!("{} {} {}", e.action, e.target, e.detail))
        .collect()
}

/// A multipart upload body: a `title` field and a `file` field with `file`.
fn upload_body(boundary: &str, file: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nT\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.mp4\"\r\n\
         Content-Type: video/mp4\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(file);
    b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    b
}

fn upload_request(token: &str, body: Body) -> Request<Body> {
    Request::post("/api/v1/uploads")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=XyZ")
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn one_account_cannot_take_the_uploads_from_the_others() {
    use futures::StreamExt;
    let f = fixture_with(
        "[quotas]\nconcurrent_uploads = 1\nuploads_per_day = 3\nbytes_per_account = 5000\n",
    )
    .await;
    let staging = f._dir.path().join("data").join("staging");
    let a = token_for(&f, "a@example.com", "uploader").await;
    let b = token_for(&f, "b@example.com", "uploader").await;
    let op = token_for(&f, "op@example.com", "operator").await;
    let junk = |n: usize| Body::from(upload_body("XyZ", &vec![7u8; n]));

    // An upload that never finishes holds a's one slot...
    let body = upload_body("XyZ", b"partial file");
    let head = body[..body.len() - "\r\n--XyZ--\r\n".len()].to_vec();
    let stalled = futures::stream::iter(vec![Ok::<_, std::io::Error>(bytes::Bytes::from(head))])
        .chain(futures::stream::pending());
    let app = f.app.clone();
    let held_req = upload_request(&a, Body::from_stream(stalled));
    let held = tokio::spawn(async move { app.oneshot(from_client(held_req)).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (s, _, body) = send(&f, upload_request(&a, junk(10))).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_uploads"),
        "{body}"
    );
    // ...but not b's, nor an operator's.
    let (s, _, body) = send(&f, upload_request(&b, junk(10))).await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "probed, not a movie: {body}"
    );
    let (s, _, body) = send(&f, upload_request(&op, junk(10))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // The stalled upload gone (its client hung up), the slot is free again.
    held.abort();
    let _ = held.await;
    let (s, _, body) = send(&f, upload_request(&a, junk(10))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // Bytes kept: an upload that would pass the quota is cut off as soon as
    // it does, and leaves nothing behind.
    let (s, _, body) = send(&f, upload_request(&b, junk(6000))).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded"),
        "{body}"
    );
    let b_id = account_id(&f, "b@example.com").await;
    f.db.insert_asset("kept", b_id, "Kept", "k.mp4", 4000)
        .await
        .unwrap();
    let (s, _, body) = send(&f, upload_request(&b, junk(1500))).await;
    assert_eq!(code(&body), "quota_exceeded", "{s} {body}");
    let (s, _, body) = send(&f, upload_request(&b, junk(900))).await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "within the quota: {body}"
    );
    // A rejected movie's bytes do not count.
    f.db.reject("kept", "seed", "processing_failed", "x")
        .await
        .unwrap();
    let (s, _, body) = send(&f, upload_request(&b, junk(4500))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // Uploads per day: three made, the fourth waits.
    let a_id = account_id(&f, "a@example.com").await;
    for i in 0..3 {
        f.db.insert_asset(&format!("a{i}"), a_id, "A", "a.mp4", 1)
            .await
            .unwrap();
    }
    let (s, _, body) = send(&f, upload_request(&a, junk(10))).await;
    assert_eq!(
        (s, code(&body).as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_uploads"),
        "{body}"
    );
    assert!(body.contains("24 hours"), "{body}");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".upload"))
        .collect();
    assert!(left.is_empty(), "no half-written upload left: {left:?}");
}
