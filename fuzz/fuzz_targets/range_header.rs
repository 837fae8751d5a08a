//! The node's `Range`/`If-Range` handling, as any player sends them: never
//! a panic, and a partial answer always lies inside the file.
//!
//! Input: 8 bytes of file length (little-endian, taken modulo 2^40), then
//! the `Range` value; a second line, if any, is `If-Range`.
#![no_main]
use axum::http::{header, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use viewnode::play::{resolve_range, Want};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let len = u64::from_le_bytes(data[0..8].try_into().unwrap()) % (1 << 40);
    let mut parts = data[8..].splitn(2, |b| *b == b'\n');
    let mut headers = HeaderMap::new();
    if let Some(Ok(v)) = parts.next().map(HeaderValue::from_bytes) {
        headers.insert(header::RANGE, v);
    }
    if let Some(Ok(v)) = parts.next().map(HeaderValue::from_bytes) {
        headers.insert(header::IF_RANGE, v);
    }
    match resolve_range(&headers, "\"etag\"", len) {
        Want::Partial(a, b) => assert!(a < b && b <= len, "{a}..{b} of {len}"),
        Want::Full | Want::Unsatisfiable => {}
    }
});
