//! Property tests: random plaintexts and ranges round-trip, and no input
//! (however malformed) makes the reading side panic.

use bytes::Bytes;
use futures::executor::block_on;
use futures::StreamExt;
use proptest::prelude::*;
use shared::{
    open_all, open_range, seal_with_params, DataKey, Opener, SealedHeader, SealedLayout, Sealer,
    HEADER_LEN,
};

const ASSET: &str = "asset-p";

fn key() -> DataKey {
    DataKey::from_bytes([7; 32])
}

fn read_range(
    sealed: Vec<u8>,
    len: u64,
    start: u64,
    end: u64,
) -> Result<Vec<u8>, shared::SealError> {
    let stream = open_range(Bytes::from(sealed), key(), ASSET.into(), len, start, end)?;
    block_on(async {
        let mut stream = Box::pin(stream);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    })
}

/// Random bytes, half of the time behind a valid header, so parsing gets
/// past the magic and the segment logic is exercised too.
fn maybe_with_header() -> impl Strategy<Value = Vec<u8>> {
    let tail = proptest::collection::vec(any::<u8>(), 0..400);
    prop_oneof![
        tail.clone(),
        (
            prop_oneof![Just(16u32), Just(17), Just(64)],
            any::<u32>(),
            tail
        )
            .prop_map(|(seg, key_id, tail)| {
                let header = SealedHeader {
                    segment_size: seg,
                    key_id,
                    salt: [1; 32],
                    nonce_prefix: [2; 7],
                };
                let mut bytes = header.to_bytes().to_vec();
                bytes.extend(tail);
                bytes
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_ranges_round_trip(
        plain in proptest::collection::vec(any::<u8>(), 0..2000),
        seg in 16u32..200,
        a in any::<u64>(),
        b in any::<u64>(),
        chunks in proptest::collection::vec(1usize..300, 1..8),
    ) {
        // Seal in random chunk sizes.
        let mut sealer = Sealer::with_params(&key(), ASSET, 1, seg, [1; 32], [2; 7]);
        let mut sealed = Vec::new();
        let mut rest = &plain[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = chunks[i % chunks.len()].min(rest.len());
            sealer.update(&rest[..n], &mut sealed);
            rest = &rest[n..];
            i += 1;
        }
        let (id, len) = sealer.finish(&mut sealed);
        prop_assert_eq!(len, sealed.len() as u64);
        let (again, id2) = seal_with_params(&key(), ASSET, 1, seg, [1; 32], [2; 7], &plain);
        prop_assert_eq!(&again, &sealed);
        prop_assert_eq!(id, id2);
        prop_assert_eq!(SealedLayout::for_plaintext(seg, plain.len() as u64).unwrap().sealed_len(), len);
        prop_assert_eq!(&open_all(&key(), ASSET, &sealed).unwrap(), &plain);

        let n = plain.len() as u64 + 1;
        let (s, e) = { let (x, y) = (a % n, b % n); (x.min(y), x.max(y)) };
        let got = read_range(sealed, len, s, e).unwrap();
        prop_assert_eq!(&got[..], &plain[s as usize..e as usize]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in maybe_with_header(),
        claimed_len in any::<u64>(),
        start in any::<u64>(),
        end in any::<u64>(),
        index in any::<u64>(),
    ) {
        let _ = SealedHeader::parse(&bytes);
        let _ = open_all(&key(), ASSET, &bytes);
        for len in [bytes.len() as u64, claimed_len] {
            let _ = SealedLayout::new(16, len);
            if let Ok(opener) = Opener::new(&key(), ASSET, &bytes, len) {
                let _ = opener.open_segment(index, &bytes);
                let _ = opener.layout().segments_for(start, end);
            }
            let _ = read_range(bytes.clone(), len, start.min(end), start.max(end));
        }
    }

    #[test]
    fn mutated_blobs_never_panic_and_never_open_wrongly(
        plain in proptest::collection::vec(any::<u8>(), 0..300),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        header_seg in prop_oneof![Just(None), (0u32..64).prop_map(Some)],
    ) {
        let (mut sealed, _) = seal_with_params(&key(), ASSET, 1, 16, [3; 32], [4; 7], &plain);
        let original = sealed.clone();
        for (at, byte) in &edits {
            let i = at.index(sealed.len());
            sealed[i] ^= byte;
        }
        if let Some(seg) = header_seg {
            sealed[5..9].copy_from_slice(&seg.to_be_bytes());
        }
        if truncate {
            sealed.truncate(cut.index(sealed.len() + 1));
        }
        let result = open_all(&key(), ASSET, &sealed);
        if sealed != original {
            prop_assert!(result.is_err(), "a modified blob opened");
        } else {
            prop_assert_eq!(result.unwrap(), plain.clone());
        }
        let len = sealed.len() as u64;
        let streamed = read_range(sealed.clone(), len, 0, plain.len() as u64);
        if sealed != original {
            prop_assert!(streamed.is_err() || plain.is_empty() && sealed.len() >= HEADER_LEN);
        }
    }
}
