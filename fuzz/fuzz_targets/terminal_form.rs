//! The in-world terminal's form posts (play, buy, link), as anyone can send
//! them: a `4xx` code or an answer, never a `5xx` or a panic.
//!
//! Input: one byte choosing the call, then the form body.
#![no_main]
use axum::{body::Body, http::Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, body)) = data.split_first() else {
        return;
    };
    let call = ["play", "buy", "link"][*which as usize % 3];
    let r = Request::post(format!("/api/v1/terminal/{call}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body.to_vec()))
        .expect("a request");
    slmedia_fuzz::manager().send(r);
});
