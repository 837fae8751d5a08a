//! Both configurations, as an operator might mistype them: loading never
//! panics; it loads or says which field is wrong.
//!
//! Input: one byte choosing the manager's (even) or the node's (odd)
//! configuration, then the TOML text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if which % 2 == 0 {
        let _ = manager::Config::from_toml(text);
    } else {
        let _ = viewnode::Config::from_toml(text);
    }
});
