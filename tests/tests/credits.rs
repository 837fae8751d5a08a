//! Credits, pay-per-view and their attacks (issue 7, docs/credits.md), with
//! real processes: sign-up with its bonus, the log-in rate limit, bad
//! amounts, two purchases racing for a balance that covers one, retried,
//! replayed and forged terminal requests, avatar linking, a rejected movie,
//! a grant used after expiry, and the refund of a grant nobody played.

use std::time::{Duration, Instant};

use e2e::{error_code as code, make_webm, no_redirects, Cluster, ClusterOpts};

const LIMIT: Duration = Duration::from_secs(240);
const PRICE: i64 = 600;

use e2e::status_json as json;
use shared::runtime::unix_now as now;

/// The value of the first `name="csrf" value="…"` in a page.
fn page_csrf(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[at..at + html[at..].find('"').unwrap()].to_string()
}

/// The text between `start` and the next `end` after it.
fn between<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let at = html
        .find(start)
        .unwrap_or_else(|| panic!("{start} not in page"))
        + start.len();
    &html[at..at + html[at..].find(end).unwrap()]
}

/// A browser-like session: signs up (or logs in) through the forms.
struct Session {
    cookie: String,
}

impl Session {
    async fn form(m: &str, page: &str, email: &str, password: &str) -> (u16, Option<Session>) {
        let (status, cookie) = e2e::form_login(m, page, email, password).await;
        (status, cookie.map(|cookie| Session { cookie }))
    }

    async fn get(&self, url: &str) -> String {
        no_redirects()
            .get(url)
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn post(&self, url: &str, form: &[(&str, &str)]) -> (u16, String) {
        let r = no_redirects()
            .post(url)
            .header("cookie", &self.cookie)
            .form(form)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

fn llhmac(secret: &str, body: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_purchases_and_their_attacks() {
    let mut o = ClusterOpts::new(&["utah", "toronto"]);
    o.fixed_ports = true;
    o.manager_extra =
        "[credits]\ngrant_window_secs = 60\nrefund_grace_secs = 30\nsweep_interval_secs = 1\nupload_cost = 1\n"
            .into();
    let cluster = Cluster::start_with(&o);
    let client = cluster.client();
    let m = cluster.manager.url.clone();
    let op = cluster.api_token.clone();

    // Uploads cost 1 credit here; the operator starts with 10.
    cluster.grant_credits(&cluster.operator_email, 10, "uploads");
    // Movies: one to sell, one the pipeline rejects.
    let input = cluster.dir.path().join("sale.webm");
    make_webm(&input);
    let (s, v) = cluster.upload(&input, "For sale").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let asset = v["asset_id"].as_str().unwrap().to_string();
    // Queued behind the first (one transcode worker), cancelled: `rejected`.
    let (s, v) = cluster.upload(&input, "Cancelled").await.unwrap();
    assert_eq!(s, 202, "{v}");
    let rejected = v["asset_id"].as_str().unwrap().to_string();
    let r = client
        .post(format!("{m}/api/v1/assets/{rejected}/cancel"))
        .bearer_auth(&op)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Sign-up through the web form: the account starts with the bonus.
    let (s, buyer) =
        Session::form(&m, "/signup", "buyer@example.com", "correct horse battery").await;
    assert_eq!(s, 303);
    let buyer = buyer.expect("signed up and logged in");
    let (s, _) = Session::form(&m, "/signup", "buyer@example.com", "another password").await;
    assert_eq!(s, 400, "the same email twice");
    let (s, _) = Session::form(&m, "/signup", "short@example.com", "short").await;
    assert_eq!(s, 400, "a short password");
    let html = buyer.get(&format!("{m}/account")).await;
    assert_eq!(
        between(&html, "<strong id=\"balance\">", "<"),
        "1000",
        "{html}"
    );
    assert!(html.contains("signup_bonus"), "{html}");
    let buyer_token = cluster.manager_cli(&["create-token", "--email", "buyer@example.com"]);

    // Log-in rate limit: after 10 failures for the account, even the right
    // password is refused for a while.
    for _ in 0..10 {
        let (s, _) = Session::form(&m, "/login", "buyer@example.com", "wrong password!").await;
        assert_eq!(s, 401);
    }
    let (s, sess) = Session::form(&m, "/login", "buyer@example.com", "correct horse battery").await;
    assert_eq!((s, sess.is_none()), (429, true));

    let v = cluster.wait_terminal(&asset, LIMIT).await;
    assert_eq!(v["state"], "published", "{v}");

    // Prices: only whole, non-negative, bounded numbers; only the owner.
    let set_price = |token: String, price: serde_json::Value| {
        let client = client.clone();
        let url = format!("{m}/api/v1/assets/{asset}/price");
        async move {
            json(
                client
                    .put(url)
                    .bearer_auth(token)
                    .json(&serde_json::json!({ "price": price }))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    for bad in [
        serde_json::json!(-1),
        serde_json::json!(1.5),
        serde_json::json!("600"),
        serde_json::json!(10_000_000_000_000i64),
        serde_json::json!(u64::MAX),
    ] {
        let (s, v) = set_price(op.clone(), bad.clone()).await;
        assert_eq!((s, code(&v)), (400, Some("amount_invalid")), "{bad}: {v}");
    }
    let (s, v) = set_price(buyer_token.clone(), serde_json::json!(1)).await;
    assert_eq!((s, code(&v)), (403, Some("forbidden")), "{v}");
    let (s, v) = set_price(op.clone(), serde_json::json!(PRICE)).await;
    assert_eq!(s, 200, "{v}");

    // A paid movie shows no free media URL to others; its owner keeps one.
    let (_, v) = json(
        client
            .get(format!("{m}/api/v1/assets/{asset}"))
            .bearer_auth(&buyer_token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (v["price"].as_i64(), v["media_url"].is_null()),
        (Some(PRICE), true),
        "{v}"
    );
    assert!(cluster.asset(&asset).await["media_url"].is_string());
    let page = buyer.get(&format!("{m}/assets/{asset}")).await;
    assert!(
        !page.contains("/media/") && page.contains("Buy a view"),
        "{page}"
    );

    let purchase = |token: String, asset: String, request: String| {
        let client = client.clone();
        let m = m.clone();
        async move {
            json(
                client
                    .post(format!("{m}/api/v1/assets/{asset}/purchase"))
                    .bearer_auth(token)
                    .json(&serde_json::json!({ "request_id": request }))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };

    // Two purchases racing for a balance (1000) that covers one (600).
    let (a, b) = tokio::join!(
        purchase(buyer_token.clone(), asset.clone(), "race-a".into()),
        purchase(buyer_token.clone(), asset.clone(), "race-b".into())
    );
    let mut outcomes = [
        (a.0, code(&a.1).map(str::to_string)),
        (b.0, code(&b.1).map(str::to_string)),
    ];
    outcomes.sort();
    assert_eq!(
        outcomes,
        [(200, None), (402, Some("insufficient_credits".to_string()))],
        "{a:?} {b:?}"
    );
    let won = if a.0 == 200 { a.1 } else { b.1 };
    assert_eq!(won["balance"], 1000 - PRICE, "{won}");
    let grant = won["grant_id"].as_str().unwrap().to_string();
    let media_url = won["media_url"].as_str().unwrap().to_string();
    // The retry of the winning request is charged once.
    let (s1, r1) = purchase(buyer_token.clone(), asset.clone(), "race-a".into()).await;
    let (s2, r2) = purchase(buyer_token.clone(), asset.clone(), "race-b".into()).await;
    let retried = [(s1, r1), (s2, r2)]
        .into_iter()
        .find(|(s, _)| *s == 200)
        .expect("the winning request answers again")
        .1;
    assert_eq!(
        (
            retried["grant_id"].as_str(),
            retried["charged_now"].as_bool(),
            retried["balance"].as_i64()
        ),
        (Some(grant.as_str()), Some(false), Some(1000 - PRICE)),
        "{retried}"
    );
    // Bad request ids, the rejected movie.
    let (s, v) = purchase(buyer_token.clone(), asset.clone(), "".into()).await;
    assert_eq!((s, code(&v)), (400, Some("request_id_invalid")), "{v}");
    let v = cluster.wait_terminal(&rejected, LIMIT).await;
    assert_eq!(v["state"], "rejected", "{v}");
    let (s, v) = purchase(buyer_token.clone(), rejected.clone(), "r-1".into()).await;
    assert_eq!((s, code(&v)), (409, Some("movie_rejected")), "{v}");

    // The purchase's media URL plays (token carries the grant).
    let loc = cluster.redirect_location(&media_url).await;
    assert!(loc.contains("/play/"), "{loc}");

    // Operator grants: bad amounts, non-operators, a rule grant once per key.
    let grant_credits = |token: String, body: serde_json::Value| {
        let client = client.clone();
        let m = m.clone();
        async move {
            json(
                client
                    .post(format!("{m}/api/v1/admin/grants"))
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    for bad in [
        serde_json::json!(0),
        serde_json::json!(-5),
        serde_json::json!(2.5),
        serde_json::json!("5"),
        serde_json::json!(9_223_372_036_854_775_807i64),
    ] {
        let (s, v) = grant_credits(
            op.clone(),
            serde_json::json!({ "email": "buyer@example.com", "amount": bad, "reason": "x", "key": "k" }),
        )
        .await;
        assert_eq!((s, code(&v)), (400, Some("amount_invalid")), "{v}");
    }
    let (s, v) = grant_credits(
        buyer_token.clone(),
        serde_json::json!({ "email": "buyer@example.com", "amount": 5, "reason": "me", "key": "k" }),
    )
    .await;
    assert_eq!((s, code(&v)), (403, Some("forbidden")), "{v}");
    let rule = serde_json::json!({ "created_before": now() + 1, "amount": 100,
                                   "reason": "outage compensation", "key": "outage-1" });
    let (s, v) = grant_credits(op.clone(), rule.clone()).await;
    assert_eq!((s, v["granted"].as_i64()), (200, Some(2)), "{v}");
    let (s, v) = grant_credits(op.clone(), rule).await;
    assert_eq!((s, v["granted"].as_i64()), (200, Some(0)), "{v}");

    // Terminals: an operator registers one on the web site.
    let (s, opsess) = Session::form(
        &m,
        "/login",
        &cluster.operator_email,
        &cluster.operator_password,
    )
    .await;
    assert_eq!(s, 303);
    let opsess = opsess.unwrap();
    let csrf = page_csrf(&opsess.get(&format!("{m}/terminals")).await);
    let (s, html) = opsess
        .post(
            &format!("{m}/terminals"),
            &[("csrf", &csrf), ("name", "Lobby"), ("asset", &asset)],
        )
        .await;
    assert_eq!(s, 200, "{html}");
    let terminal = between(&html, "id=\"terminal-id\">", "<").to_string();
    let secret = between(&html, "id=\"terminal-secret\">", "<").to_string();
    let avatar = "3c0ffee0-0000-4000-8000-000000000001";
    let send = |path: &'static str, body: String, sig: String| {
        let client = client.clone();
        let url = format!("{m}{path}");
        async move {
            json(
                client
                    .post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("x-terminal-signature", sig)
                    .body(body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let buy_body = |request: &str, nonce: &str| {
        format!(
            "terminal={terminal}&asset={asset}&avatar={avatar}&request={request}&ts={}&nonce={nonce}",
            now()
        )
    };
    // Paid movies are not handed out by the free play request.
    let play = format!(
        "terminal={terminal}&asset={asset}&avatar={avatar}&ts={}&nonce=p1",
        now()
    );
    let (s, v) = send(
        "/api/v1/terminal/play",
        play.clone(),
        llhmac(&secret, &play),
    )
    .await;
    assert_eq!((s, code(&v)), (409, Some("payment_required")), "{v}");
    // An avatar not linked yet cannot buy.
    let b = buy_body("t-1", "n1");
    let (s, v) = send("/api/v1/terminal/buy", b.clone(), llhmac(&secret, &b)).await;
    assert_eq!((s, code(&v)), (409, Some("avatar_not_linked")), "{v}");
    // The buyer gets a one-time code on the account page and says it in-world.
    let bcsrf = page_csrf(&buyer.get(&format!("{m}/account")).await);
    let (s, html) = buyer
        .post(&format!("{m}/account/link-code"), &[("csrf", &bcsrf)])
        .await;
    assert_eq!(s, 200, "{html}");
    let link_code = between(&html, "id=\"link-code\"><code>", "<").to_string();
    let link = |code: &str, nonce: &str| {
        format!(
            "terminal={terminal}&avatar={avatar}&code={code}&ts={}&nonce={nonce}",
            now()
        )
    };
    let l = link("WRONG123", "l0");
    let (s, v) = send("/api/v1/terminal/link", l.clone(), llhmac(&secret, &l)).await;
    assert_eq!((s, code(&v)), (400, Some("link_code_invalid")), "{v}");
    let l = link(&link_code, "l1");
    let (s, v) = send("/api/v1/terminal/link", l.clone(), llhmac(&secret, &l)).await;
    assert_eq!(s, 200, "{v}");
    // The account page says where each link was made, and by whose screen.
    let html = buyer.get(&format!("{m}/account")).await;
    assert!(
        html.contains(avatar) && html.contains("at screen “Lobby”, account #"),
        "{html}"
    );
    let l = link(&link_code, "l2");
    let (s, v) = send("/api/v1/terminal/link", l.clone(), llhmac(&secret, &l)).await;
    assert_eq!(
        (s, code(&v)),
        (400, Some("link_code_invalid")),
        "a code works once: {v}"
    );

    // Linked, but the buyer's account never approved this terminal's owner:
    // whoever holds a terminal's secret can name any avatar (keys are
    // public), so this is the attack. Refused, nothing charged, nothing
    // about the account said.
    let ledger_len = |token: String| {
        let client = client.clone();
        let m = m.clone();
        async move {
            let (_, v) = json(
                client
                    .get(format!("{m}/api/v1/account"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            (
                v["ledger"].as_array().unwrap().len(),
                v["balance"].as_i64().unwrap(),
            )
        }
    };
    let before = ledger_len(buyer_token.clone()).await;
    let b = buy_body("t-0", "n1b");
    let (s, v) = send("/api/v1/terminal/buy", b.clone(), llhmac(&secret, &b)).await;
    assert_eq!((s, code(&v)), (403, Some("terminal_not_approved")), "{v}");
    assert!(
        !v.to_string().contains(&before.1.to_string()) && v.get("balance").is_none(),
        "nothing about the account: {v}"
    );
    assert_eq!(
        ledger_len(buyer_token.clone()).await,
        before,
        "nothing charged"
    );
    // The buyer approves the terminal's owner on the web (the screen sends
    // them to this page), with a daily cap.
    let html = buyer
        .get(&format!("{m}/account/approvals?terminal={terminal}"))
        .await;
    assert!(html.contains("id=\"pending-terminal\">Lobby<"), "{html}");
    let acsrf = page_csrf(&html);
    let (s, html) = buyer
        .post(
            &format!("{m}/account/approvals"),
            &[
                ("csrf", &acsrf),
                ("terminal", &terminal),
                ("daily_cap", "x"),
            ],
        )
        .await;
    assert_eq!(s, 400, "a cap that is not a number: {html}");
    let (s, html) = buyer
        .post(
            &format!("{m}/account/approvals"),
            &[
                ("csrf", &acsrf),
                ("terminal", &terminal),
                ("daily_cap", "1000"),
            ],
        )
        .await;
    assert_eq!(s, 200, "{html}");
    assert!(
        html.contains("id=\"approvals\"") && html.contains("<td>1000</td>"),
        "{html}"
    );

    // Balance now: 1000 - 600 + 100 = 500. A terminal purchase, retried
    // with a new nonce, is charged once; a replay and a forgery are refused.
    let b = buy_body("t-2", "n2");
    let (s, v) = send("/api/v1/terminal/buy", b.clone(), llhmac(&secret, &b)).await;
    assert_eq!((s, code(&v)), (402, Some("insufficient_credits")), "{v}");
    assert!(
        !v.to_string().contains("500"),
        "no balance in a terminal answer: {v}"
    );
    cluster.grant_credits("buyer@example.com", 1000, "test top-up");
    let b = buy_body("t-3", "n3");
    let (s, v) = send("/api/v1/terminal/buy", b.clone(), llhmac(&secret, &b)).await;
    assert_eq!((s, v["charged_now"].as_bool()), (200, Some(true)), "{v}");
    assert!(v.get("balance").is_none(), "{v}");
    assert_eq!(ledger_len(buyer_token.clone()).await.1, 1500 - PRICE);
    let tgrant = v["grant_id"].as_str().unwrap().to_string();
    // A short URL (per-agent parcel media takes at most 254 characters)
    // that the redirector turns into the node's tokened one.
    let turl = v["media_url"].as_str().unwrap().to_string();
    assert!(turl.len() <= 254 && turl.contains("/media/g/"), "{turl}");
    let loc = cluster.redirect_location(&turl).await;
    assert!(loc.contains("/play/"), "{loc}");
    let (s, v) = send("/api/v1/terminal/buy", b.clone(), llhmac(&secret, &b)).await;
    assert_eq!((s, code(&v)), (409, Some("terminal_replayed")), "{v}");
    let b = buy_body("t-3", "n4");
    let (s, v) = send("/api/v1/terminal/buy", b.clone(), llhmac(&secret, &b)).await;
    assert_eq!(
        (s, v["charged_now"].as_bool(), v["grant_id"].as_str()),
        (200, Some(false), Some(tgrant.as_str())),
        "{v}"
    );
    let b = buy_body("t-4", "n5");
    let (s, v) = send("/api/v1/terminal/buy", b.clone(), llhmac("slt_guessed", &b)).await;
    assert_eq!((s, code(&v)), (401, Some("terminal_bad_signature")), "{v}");
    // Another 600 would pass the 1000 a day the buyer allowed this owner.
    let before = ledger_len(buyer_token.clone()).await;
    let b = buy_body("t-5", "n6");
    let (s, v) = send("/api/v1/terminal/buy", b.clone(), llhmac(&secret, &b)).await;
    assert_eq!((s, code(&v)), (402, Some("daily_cap_reached")), "{v}");
    assert_eq!(
        ledger_len(buyer_token.clone()).await,
        before,
        "nothing charged"
    );
    // Revoked on the web: refused again at once.
    let html = buyer.get(&format!("{m}/account/approvals")).await;
    let owner = between(&html, "name=\"owner\" value=\"", "\"").to_string();
    let (s, html) = buyer
        .post(
            &format!("{m}/account/approvals/revoke"),
            &[("csrf", &acsrf), ("owner", &owner)],
        )
        .await;
    assert_eq!(s, 200, "{html}");
    let b = buy_body("t-6", "n7");
    let (s, v) = send("/api/v1/terminal/buy", b.clone(), llhmac(&secret, &b)).await;
    assert_eq!((s, code(&v)), (403, Some("terminal_not_approved")), "{v}");

    // A link never moves to another account: the operator's code for the
    // buyer's avatar is refused until the buyer unlinks it on the web.
    let ocsrf = page_csrf(&opsess.get(&format!("{m}/account")).await);
    let (_, html) = opsess
        .post(&format!("{m}/account/link-code"), &[("csrf", &ocsrf)])
        .await;
    let op_code = between(&html, "id=\"link-code\"><code>", "<").to_string();
    let l = link(&op_code, "l3");
    let (s, v) = send("/api/v1/terminal/link", l.clone(), llhmac(&secret, &l)).await;
    assert_eq!((s, code(&v)), (409, Some("avatar_linked_elsewhere")), "{v}");
    let (s, _) = buyer
        .post(
            &format!("{m}/account/avatars/unlink"),
            &[("csrf", &acsrf), ("avatar", avatar)],
        )
        .await;
    assert_eq!(s, 303);
    let l = link(&op_code, "l4");
    let (s, v) = send("/api/v1/terminal/link", l.clone(), llhmac(&secret, &l)).await;
    assert_eq!(s, 200, "the refused code stayed usable: {v}");

    // Nothing was played under either grant: once they expire (60 s) and
    // every node has reported its journal 30 s past that, both are
    // refunded, and the expired media URL answers 410.
    let deadline = Instant::now() + LIMIT;
    loop {
        let (_, g1) = json(
            client
                .get(format!("{m}/api/v1/grants/{grant}"))
                .bearer_auth(&buyer_token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        let (_, g2) = json(
            client
                .get(format!("{m}/api/v1/grants/{tgrant}"))
                .bearer_auth(&buyer_token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        if g1["state"] == "refunded" && g2["state"] == "refunded" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not refunded: {g1} {g2}\n{}",
            cluster.manager.log_text()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let r = no_redirects().get(&media_url).send().await.unwrap();
    let (s, v) = json(r).await;
    assert_eq!((s, code(&v)), (410, Some("token_expired")), "{v}");

    // The operators' grant form in the admin: recorded, once per form
    // (its key), and in the audit log.
    let html = opsess.get(&format!("{m}/admin/accounts")).await;
    let (ocsrf, key) = (
        page_csrf(&html),
        between(&html, "name=\"key\" value=\"", "\"").to_string(),
    );
    let form = [
        ("csrf", ocsrf.as_str()),
        ("key", key.as_str()),
        ("email", "buyer@example.com"),
        ("created_before", ""),
        ("amount", "5"),
        ("reason", "sorry for the wait"),
    ];
    let (s, html) = opsess
        .post(&format!("{m}/admin/accounts/grant"), &form)
        .await;
    assert_eq!(s, 200, "{html}");
    assert!(
        html.contains("5 credits granted to 1 account(s)."),
        "{html}"
    );
    let (s, html) = opsess
        .post(&format!("{m}/admin/accounts/grant"), &form)
        .await;
    assert!(
        s == 200 && html.contains("granted to 0 account(s)."),
        "{html}"
    );
    let audit = opsess.get(&format!("{m}/admin/audit")).await;
    assert!(
        audit.contains("grant_credits") && audit.contains("sorry for the wait"),
        "{audit}"
    );
    let bform = [
        ("csrf", bcsrf.as_str()),
        ("key", "x"),
        ("email", "buyer@example.com"),
        ("created_before", ""),
        ("amount", "5"),
        ("reason", "me"),
    ];
    let (s, _) = buyer
        .post(&format!("{m}/admin/accounts/grant"), &bform)
        .await;
    assert_eq!(s, 404, "the admin does not exist for a buyer");

    // The books: the buyer is back to 1000 + 100 + 1000 + 5; the operator
    // has 10 - 2 uploads + 1 (the cancelled one refunded) + 100; the uploader's
    // shares were reversed (only the rule grant remains); every account's
    // ledger sums to its balance.
    for (token, want) in [(buyer_token.clone(), 2105), (op.clone(), 109)] {
        let (_, v) = json(
            client
                .get(format!("{m}/api/v1/account"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(v["balance"], want, "{v}");
        let sum: i64 = v["ledger"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["amount"].as_i64().unwrap())
            .sum();
        assert_eq!(sum, want, "{v}");
    }
    // The data export is the same account, as a download.
    let r = no_redirects()
        .get(format!("{m}/account/export"))
        .header("cookie", &buyer.cookie)
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains("attachment"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (v["account"]["email"].as_str(), v["balance"].as_i64()),
        (Some("buyer@example.com"), Some(2105)),
        "{v}"
    );

    // An upload the uploader cannot pay for is refused and leaves nothing.
    cluster.manager_cli(&[
        "create-user",
        "--email",
        "poor@example.com",
        "--generate-password",
    ]);
    let poor = cluster.manager_cli(&["create-token", "--email", "poor@example.com"]);
    let form = reqwest::multipart::Form::new()
        .text("title", "Unpaid")
        .part(
            "file",
            reqwest::multipart::Part::bytes(std::fs::read(&input).unwrap()).file_name("u.webm"),
        );
    let (s, v) = json(
        client
            .post(format!("{m}/api/v1/uploads"))
            .bearer_auth(&poor)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, code(&v)), (402, Some("insufficient_credits")), "{v}");
    let staged = e2e::files_under(&cluster.manager_data.join("staging"));
    assert!(staged.is_empty(), "{staged:?}");
}
