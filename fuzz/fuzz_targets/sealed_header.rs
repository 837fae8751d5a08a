//! The sealed blob's header, as a node reads it from its disk (a disk that
//! may have been damaged): parsing never panics, what parses writes back
//! the same, and an opener is built or refused cleanly.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = shared::SealedHeader::parse(data) {
        let again = shared::SealedHeader::parse(&h.to_bytes()).expect("a header it wrote parses");
        assert_eq!(again.to_bytes(), h.to_bytes());
    }
    let key = slmedia_fuzz::data_key();
    if let Ok(o) = shared::Opener::new(&key, slmedia_fuzz::ASSET, data, data.len() as u64) {
        let layout = o.layout();
        assert!(layout.plaintext_len() <= layout.sealed_len());
    }
});
