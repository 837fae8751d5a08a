//! The upload's multipart path, with any body (fields, file names, titles,
//! file bytes the media probe reads): a `4xx` code or an accepted upload,
//! never a `5xx` or a panic, and nothing half-written left in staging.
//!
//! Input: the multipart body, with the boundary `XyZ`.
#![no_main]
use axum::{body::Body, http::Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let m = slmedia_fuzz::manager();
    let r = Request::post("/api/v1/uploads")
        .header("authorization", format!("Bearer {}", m.token))
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(Body::from(data.to_vec()))
        .expect("a request");
    m.send(r);
    m.no_partial_uploads();
});
