//! Viewer-facing playback: `GET`/`HEAD /play/{token}/{name}.mp4`.
//!
//! The token is verified locally (Ed25519, manager's public key), the asset's
//! data key is unwrapped with this node's master key, and only the segments a
//! byte range touches are read and authenticated, one at a time as the client
//! drains the response, so memory per request stays at one segment and a slow
//! client slows the reads instead of filling buffers.

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use shared::{BlobId, PlaybackClaims, SealError};

use crate::{error::NodeError, SharedState};

/// What the `Range`/`If-Range` headers ask for, resolved against the length.
#[derive(Debug, PartialEq, Eq)]
pub enum Want {
    Full,
    Partial(u64, u64), // [start, end)
    Unsatisfiable,
}

/// Public for the fuzz target (`fuzz/fuzz_targets/range_header.rs`).
pub fn resolve_range(headers: &HeaderMap, etag: &str, len: u64) -> Want {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Want::Full;
    };
    // A validator that no longer matches means "send me the whole new thing".
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        if if_range.as_bytes() != etag.as_bytes() {
            return Want::Full;
        }
    }
    use http_range_header::{EndPosition, RangeUnsatisfiableError, StartPosition};
    // The crate parses the syntax; what a parsed range *means* is resolved
    // here, because its `validate` departs from RFC 9110 §14.1.2-3 in three
    // places that players hit: a suffix longer than the file is the whole
    // file (not 416), `-0` is unsatisfiable (not a syntax error), and
    // `a-b` with b < a is an invalid header to ignore (not 416).
    let parsed = match http_range_header::parse_range_header(range) {
        Ok(p) => p,
        Err(RangeUnsatisfiableError::ZeroSuffix) => return Want::Unsatisfiable,
        // RFC 9110 14.2: a Range header we cannot parse is ignored.
        Err(_) => return Want::Full,
    };
    // Multipart byteranges buy players nothing; the whole body is valid too.
    let [r] = parsed.ranges.as_slice() else {
        return Want::Full;
    };
    match (r.start, r.end) {
        (StartPosition::FromLast(n), _) if n >= len && len > 0 => Want::Partial(0, len),
        // (`n < len` also keeps an empty file from underflowing.)
        (StartPosition::FromLast(n), _) if n > 0 && n < len => Want::Partial(len - n, len),
        (StartPosition::FromLast(_), _) => Want::Unsatisfiable,
        (StartPosition::Index(a), EndPosition::Index(b)) if b < a => Want::Full,
        (StartPosition::Index(a), _) if a >= len => Want::Unsatisfiable,
        (StartPosition::Index(a), EndPosition::Index(b)) => Want::Partial(a, b.min(len - 1) + 1),
        (StartPosition::Index(a), EndPosition::LastByte) => Want::Partial(a, len),
    }
}

/// How long a paid response's first bytes wait for their journal event to
/// be fsynced (normally a few milliseconds).
const FIRST_EVENT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn play(
    State(st): State<SharedState>,
    Path((token, _name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, NodeError> {
    let claims: PlaybackClaims = crate::playcache::verify(&st, &token)?;
    st.prices.check(&claims)?;
    // A paid response is registered before any I/O: until its first bytes
    // are journalled it holds the node's watermark (journal.rs), however
    // slow the storage is to open.
    if claims.grant.is_some() && !st.journal.accepts_new_views() {
        return Err(NodeError::JournalFull);
    }
    let paid = claims
        .grant
        .clone()
        .map(|g| st.journal.served(g, claims.asset_id.clone()));
    let blob: BlobId = claims.blob;
    let warm = crate::playcache::warm(&claims);
    let Some((file, sealed_len)) = st.store.open_for_playback(&blob, warm).await? else {
        crate::scrub::report_missing(&st, blob);
        return Err(NodeError::BlobMissing);
    };
    let opener = match crate::playcache::cached_opener(&claims, sealed_len) {
        Some(o) => o,
        None => {
            let key = st
                .master
                .unwrap(&claims.asset_id, &claims.wrapped_key)
                .map_err(|e| {
                    tracing::error!(asset = %claims.asset_id, "cannot unwrap data key: {e}");
                    NodeError::KeyUnavailable
                })?;
            let header_bytes = file
                .read_header((shared::HEADER_LEN as u64).min(sealed_len) as usize)
                .await
                .map_err(|e| NodeError::Storage(e.to_string()))?;
            match shared::Opener::new(&key, &claims.asset_id, &header_bytes, sealed_len) {
                Ok(o) => {
                    crate::playcache::keep_opener(&claims, &o);
                    o
                }
                Err(e) => {
                    quarantine(&st, blob, &e).await;
                    return Err(NodeError::Damaged);
                }
            }
        }
    };

    let plain_len = opener.layout().plaintext_len();
    let etag = format!("\"{blob}\"");
    let want = resolve_range(&headers, &etag, plain_len);
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "video/mp4")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &etag)
        // Paid content: no shared cache may keep it; the URL is per viewer.
        .header(header::CACHE_CONTROL, "private, no-store, no-transform");
    let (start, end) = match want {
        Want::Unsatisfiable => {
            return Ok(resp
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{plain_len}"))
                .body(Body::empty())
                .expect("static headers are valid"));
        }
        Want::Full => {
            resp = resp.status(StatusCode::OK);
            (0, plain_len)
        }
        Want::Partial(s, e) => {
            resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {s}-{}/{plain_len}", e - 1),
            );
            (s, e)
        }
    };
    resp = resp.header(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if method == Method::HEAD || start == end {
        return Ok(resp.body(Body::empty()).expect("valid response"));
    }
    let stream = file
        .stream(opener, start, end)
        .map_err(|e| NodeError::Storage(e.to_string()))?;
    let served = end - start;
    let st2 = st.clone();
    let body = stream.then(move |item| {
        let st = st2.clone();
        async move {
            match item {
                Ok(bytes) => Ok(bytes),
                Err(e) => {
                    if matches!(e, SealError::SegmentAuth { .. }) {
                        quarantine(&st, blob, &e).await;
                    }
                    Err(std::io::Error::other(e.to_string()))
                }
            }
        }
    });
    metrics::counter!("viewnode_bytes_served_total").increment(served);
    // A paid view journals the bytes the client actually took (journal.rs).
    // Its first bytes leave only once their event is on disk (or after a
    // short wait, if the journal disk is failing: then the event waits in
    // memory and the watermark holds every refund meanwhile).
    let body = match paid {
        Some(mut served) => {
            let journal = st.journal.clone();
            body.then(move |item| {
                // Only the first bytes wait (and hold a handle on the journal).
                let first = match &item {
                    Ok(b) => served.add(b.len()).map(|seq| (journal.clone(), seq)),
                    Err(_) => None,
                };
                async move {
                    if let Some((journal, seq)) = first {
                        journal.until_durable(seq, FIRST_EVENT_WAIT).await;
                    }
                    item
                }
            })
            .left_stream()
        }
        // No box for free views: the serve benchmark's hot path.
        None => body.right_stream(),
    };
    Ok(resp
        .body(Body::from_stream(body))
        .expect("valid response")
        .into_response())
}

/// A copy that fails authentication is never served again: it moves to
/// quarantine and is reported, and a verified copy elsewhere repairs it.
async fn quarantine(st: &SharedState, blob: BlobId, why: &SealError) {
    tracing::error!(%blob, code = why.code(), "stored copy failed authentication; quarantining");
    crate::scrub::quarantine_and_report(st, blob, "read_auth_failed").await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn ranges_resolve_like_rfc_9110() {
        let e = "\"x\"";
        assert_eq!(resolve_range(&hdrs(&[]), e, 100), Want::Full);
        assert_eq!(
            resolve_range(&hdrs(&[(header::RANGE, "bytes=0-9")]), e, 100),
            Want::Partial(0, 10)
        );
        assert_eq!(
            resolve_range(&hdrs(&[(header::RANGE, "bytes=90-")]), e, 100),
            Want::Partial(90, 100)
        );
        assert_eq!(
            resolve_range(&hdrs(&[(header::RANGE, "bytes=-5")]), e, 100),
            Want::Partial(95, 100)
        );
        assert_eq!(
            resolve_range(&hdrs(&[(header::RANGE, "bytes=100-")]), e, 100),
            Want::Unsatisfiable
        );
        assert_eq!(
            resolve_range(&hdrs(&[(header::RANGE, "pages=1")]), e, 100),
            Want::Full
        );
        // RFC 9110 §14.1.2-3 where the range crate's own check differs.
        for (range, want) in [
            ("bytes=-500", Want::Partial(0, 100)),
            ("bytes=-100", Want::Partial(0, 100)),
            ("bytes=-0", Want::Unsatisfiable),
            ("bytes=20-10", Want::Full),
            ("bytes=95-1000", Want::Partial(95, 100)),
            ("bytes=99-99", Want::Partial(99, 100)),
            ("bytes=100-200", Want::Unsatisfiable),
            ("bytes=0-1,5-6", Want::Full),
        ] {
            assert_eq!(
                resolve_range(&hdrs(&[(header::RANGE, range)]), e, 100),
                want,
                "{range}"
            );
        }
        assert_eq!(
            resolve_range(&hdrs(&[(header::RANGE, "bytes=0-")]), e, 0),
            Want::Unsatisfiable
        );
        // A suffix of an empty file (it underflowed once).
        assert_eq!(
            resolve_range(&hdrs(&[(header::RANGE, "bytes=-5")]), e, 0),
            Want::Unsatisfiable
        );
        assert_eq!(
            resolve_range(
                &hdrs(&[(header::RANGE, "bytes=0-9"), (header::IF_RANGE, "\"old\"")]),
                e,
                100
            ),
            Want::Full
        );
        assert_eq!(
            resolve_range(
                &hdrs(&[(header::RANGE, "bytes=0-9"), (header::IF_RANGE, e)]),
                e,
                100
            ),
            Want::Partial(0, 10)
        );
    }
}
