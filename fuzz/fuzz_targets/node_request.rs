//! A node call's signature headers, as a server reads them from anyone on
//! the network: never a panic, and what verifies names the key it was
//! signed with.
//!
//! Input: lines `authorization`, `method`, `path`, `date`, `content hash`
//! (also read as an answer's presented MAC).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let (auth, method, path, date, sha) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    let lookup = |id: &str| (id == "utah").then(|| slmedia_fuzz::NODE_SECRET.to_vec());
    let now = date.parse::<i64>().unwrap_or(0);
    if let Ok(id) = shared::verify_request(lookup, auth, method, path, date, now, sha) {
        assert_eq!(id, "utah");
        assert_eq!(shared::auth_key_id(auth), Some("utah"));
    }
    // The answer's MAC, as a node checks what comes back: the fifth line
    // as the presented MAC over the path as the body.
    let _ = shared::verify_answer_mac(&slmedia_fuzz::NODE_SECRET, auth, 200, path.as_bytes(), sha);
});
