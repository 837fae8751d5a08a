//! Playback tokens, as they arrive in a media URL from anyone: verifying
//! never panics, and a token that verifies is one the signer made (its
//! claims sign back to the same token).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let signer = slmedia_fuzz::token_signer();
    let verifier = shared::TokenVerifier::from_public_hex(&signer.public_hex())
        .expect("the signer's public key");
    if let Ok(claims) = verifier.verify(text, 0) {
        assert!(claims.expires_at > 0);
        // Ed25519 signatures are deterministic: a verified token is exactly
        // what the signer makes of its claims.
        assert_eq!(signer.sign(&claims), text);
    }
});
