//! What a node posts to the manager (its view journal, its reports of lost
//! and damaged copies), correctly signed but with any body: the manager
//! answers with a `4xx` code or takes it, never a `5xx` or a panic.
//!
//! Input: one byte choosing the call (even: journal, odd: events), then
//! the body.
#![no_main]
use axum::{body::Body, http::Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, body)) = data.split_first() else {
        return;
    };
    let what = if which % 2 == 0 { "journal" } else { "events" };
    let path = format!("/internal/v1/nodes/utah/{what}");
    let now = shared::runtime::unix_now();
    let auth = shared::sign_request(
        &slmedia_fuzz::NODE_SECRET,
        "utah",
        "POST",
        &path,
        now,
        &shared::content_sha256_hex(body),
    );
    let r = Request::post(&path)
        .header(shared::AUTH_HEADER, auth)
        .header(shared::DATE_HEADER, now.to_string())
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .expect("a request");
    slmedia_fuzz::manager().send(r);
});
