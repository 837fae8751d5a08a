//! The manager's HTTP error type. Every rejection, JSON or HTML, carries a
//! stable machine-readable code and one human sentence; the status mapping
//! lives here and nowhere else.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("log in, or send `Authorization: Bearer <api token>`")]
    Unauthenticated,
    #[error("you may not do that")]
    Forbidden,
    #[error("the form was stale or forged (CSRF check failed); reload the page and try again")]
    Csrf,
    #[error("no such {0}")]
    NotFound(&'static str),
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("the file is larger than the {limit} bytes this site accepts")]
    TooLarge { limit: u64 },
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("this movie is not published yet")]
    NotPublished,
    #[error("no mirror holding this movie is reachable right now; try again in a minute")]
    NoMirror,
    #[error("too many attempts; wait a minute and try again")]
    RateLimited,
    /// A per-account upload limit (`crate::quotas`).
    #[error("{0}")]
    TooManyUploads(String),
    #[error("{0}")]
    QuotaExceeded(String),
    /// The data disk is at its reserve (`disk_reserve_mb`).
    #[error("{0}")]
    InsufficientStorage(String),
    /// Too many password checks are running at once; nothing was checked.
    #[error("the site is busy; try again in a few seconds")]
    Busy,
    /// A terminal purchase for an account that has not approved the
    /// terminal's owner; says nothing about the account (docs/credits.md).
    #[error("purchases through this screen need your approval first: approve its owner on your account page on the web site")]
    TerminalNotApproved,
    /// Payment is needed or refused for a reason other than the balance
    /// (`payment_required`, `daily_cap_reached`).
    #[error("{message}")]
    PaymentRequired { code: &'static str, message: String },
    #[error("{message}")]
    TerminalRefused { code: &'static str, message: String },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A credential other than a session or API token was refused (a
    /// transcode worker's registration token, a revoked worker).
    #[error("{message}")]
    NotAuthorized { code: &'static str, message: String },
    /// A media URL's token was refused (see [`shared::TokenError`]): 403 for
    /// a forged or malformed one, 410 once it has expired, as on the nodes.
    #[error("{0}")]
    Token(shared::TokenError),
    #[error(
        "this media URL has no playback token; ask the site or the in-world screen for a new one"
    )]
    TokenMissing,
    #[error("this playback token is for another movie")]
    TokenWrongAsset,
    /// A node's signed call was refused (unknown node, bad signature, …).
    #[error("{0}")]
    NodeAuth(shared::NodeAuthError),
    #[error("every stored copy of this movie is lost or corrupt; it cannot be played until an operator restores it")]
    Damaged,
    /// A purchase the buyer's balance does not cover (docs/credits.md).
    #[error("your balance ({balance} credits) does not cover the price ({price} credits)")]
    InsufficientCredits { balance: i64, price: i64 },
    /// Something that existed and is gone for good (an expired upload).
    #[error("{message}")]
    Gone { code: &'static str, message: String },
    /// A tus chunk whose `Upload-Checksum` does not match (tus's own 460).
    #[error("the chunk's checksum does not match its bytes; it was discarded, send it again")]
    ChecksumMismatch,
    #[error("{message}")]
    UnsupportedMediaType { code: &'static str, message: String },
    /// A protocol version the client asks for and we do not speak.
    #[error("{message}")]
    PreconditionFailed { code: &'static str, message: String },
    /// A tus chunk past the upload's declared length.
    #[error(
        "the chunk goes past the upload's declared length of {length} bytes; it was discarded"
    )]
    PastLength { length: u64 },
    /// Another request holds the resource and would not let go in time.
    #[error("{message}")]
    Locked { code: &'static str, message: String },
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        db_error(e)
    }
}

/// A database that cannot grow (its disk full: SQLite's `SQLITE_FULL`,
/// PostgreSQL's `53100 disk_full`) refused the write and rolled it back:
/// the caller gets `507` and may try again, nothing was half-written.
fn db_error(e: sqlx::Error) -> ApiError {
    let full = match &e {
        sqlx::Error::Database(d) => matches!(d.code().as_deref(), Some("13") | Some("53100")),
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::StorageFull,
        _ => false,
    };
    if full {
        tracing::error!(
            code = "insufficient_storage",
            "the database's disk is full: {e}"
        );
        return ApiError::InsufficientStorage(
            "the site's disk is full; nothing was changed, try again later (the operator has been told)".into(),
        );
    }
    ApiError::Internal(e.into())
}

impl From<crate::limits::RateLimited> for ApiError {
    fn from(_: crate::limits::RateLimited) -> Self {
        ApiError::RateLimited
    }
}

impl From<crate::redirect::RedirectError> for ApiError {
    fn from(e: crate::redirect::RedirectError) -> Self {
        use crate::redirect::RedirectError as E;
        match e {
            E::Token(t) => ApiError::Token(t),
            E::NoMirror => ApiError::NoMirror,
            E::PaymentRequired => ApiError::PaymentRequired {
                code: "payment_required",
                message: E::PaymentRequired.to_string(),
            },
            E::Db(e) => db_error(e),
            E::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<crate::ledger::LedgerError> for ApiError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        use crate::ledger::LedgerError as E;
        match e {
            E::Invalid { code, message } => ApiError::BadRequest { code, message },
            E::Conflict { code, message } => ApiError::Conflict { code, message },
            E::NotFound(what) => ApiError::NotFound(what),
            E::TerminalNotApproved => ApiError::TerminalNotApproved,
            E::PaymentRequired { code, message } => ApiError::PaymentRequired { code, message },
            E::InsufficientCredits { balance, price } => {
                ApiError::InsufficientCredits { balance, price }
            }
            E::NotPublished => ApiError::NotPublished,
            E::NoMirror => ApiError::NoMirror,
            E::Damaged => ApiError::Damaged,
            E::Db(e) => db_error(e),
            E::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<crate::ingest::IngestError> for ApiError {
    fn from(e: crate::ingest::IngestError) -> Self {
        use crate::ingest::IngestError as E;
        match e {
            E::Empty => ApiError::Unprocessable {
                code: "empty_file",
                message: E::Empty.to_string(),
            },
            E::BadTitle { code, message } => ApiError::BadRequest { code, message },
            E::Rejected { code, message } => ApiError::Unprocessable { code, message },
            E::Ledger(e) => e.into(),
            E::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<crate::tus::TusError> for ApiError {
    fn from(e: crate::tus::TusError) -> Self {
        use crate::tus::TusError as E;
        let message = e.to_string();
        match e {
            E::NotFound => ApiError::NotFound("upload"),
            E::Gone => ApiError::Gone {
                code: "upload_expired",
                message,
            },
            E::OffsetMismatch { .. } => ApiError::Conflict {
                code: "offset_mismatch",
                message,
            },
            E::ChecksumMismatch => ApiError::ChecksumMismatch,
            E::Invalid { code, message } => ApiError::BadRequest { code, message },
            E::TooLarge { limit } => ApiError::TooLarge { limit },
            E::PastLength { length } => ApiError::PastLength { length },
            E::Busy => ApiError::Locked {
                code: "upload_busy",
                message,
            },
            E::CannotPay { balance, cost } => ApiError::InsufficientCredits {
                balance,
                price: cost,
            },
            E::FinishLater(_) => ApiError::Locked {
                code: "upload_finishing",
                message,
            },
            E::Cut { .. } => ApiError::BadRequest {
                code: "upload_incomplete",
                message,
            },
            E::Quota(q) => q.into(),
            E::Ingest(e) => e.into(),
            E::Db(e) => db_error(e),
            E::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<crate::runners::RunnerError> for ApiError {
    fn from(e: crate::runners::RunnerError) -> Self {
        use crate::runners::RunnerError as E;
        let (code, message) = (e.code(), e.to_string());
        match e {
            E::Auth(a) => ApiError::NodeAuth(a),
            E::Revoked | E::TokenInvalid => ApiError::NotAuthorized { code, message },
            E::BadName | E::BadLease | E::Bad(_) => ApiError::BadRequest { code, message },
            E::NameTaken(_)
            | E::JobTaken
            | E::Busy
            | E::Lost
            | E::ResultInProgress
            | E::SourceRejected { .. } => ApiError::Conflict { code, message },
            E::ResultRefused(_) | E::ResultCorrupt => ApiError::Unprocessable { code, message },
            E::TooLarge(limit) => ApiError::TooLarge { limit },
            E::NoSpace => ApiError::InsufficientStorage(message),
            E::Db(e) => db_error(e),
            E::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        match e {
            crate::auth::AuthError::Busy => ApiError::Busy,
            crate::auth::AuthError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<crate::avatars::LinkError> for ApiError {
    fn from(e: crate::avatars::LinkError) -> Self {
        use crate::avatars::LinkError as E;
        match e {
            E::CodeInvalid => {
                ApiError::bad_request("link_code_invalid", E::CodeInvalid.to_string())
            }
            E::LinkedElsewhere => ApiError::Conflict {
                code: "avatar_linked_elsewhere",
                message: E::LinkedElsewhere.to_string(),
            },
            E::Db(e) => db_error(e),
        }
    }
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden => "forbidden",
            ApiError::Csrf => "csrf_failed",
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest { code, .. }
            | ApiError::Unprocessable { code, .. }
            | ApiError::TerminalRefused { code, .. }
            | ApiError::PaymentRequired { code, .. }
            | ApiError::NotAuthorized { code, .. }
            | ApiError::Conflict { code, .. } => code,
            ApiError::TooLarge { .. } => "too_large",
            ApiError::NotPublished => "not_published",
            ApiError::NoMirror => "no_mirror_available",
            ApiError::RateLimited => "rate_limited",
            ApiError::TooManyUploads(_) => "too_many_uploads",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::InsufficientStorage(_) => "insufficient_storage",
            ApiError::Busy => "busy",
            ApiError::TerminalNotApproved => "terminal_not_approved",
            ApiError::Token(e) => e.code(),
            ApiError::TokenMissing => "token_missing",
            ApiError::TokenWrongAsset => "token_wrong_asset",
            ApiError::NodeAuth(e) => e.code(),
            ApiError::Damaged => "movie_damaged",
            ApiError::InsufficientCredits { .. } => "insufficient_credits",
            ApiError::Gone { code, .. }
            | ApiError::UnsupportedMediaType { code, .. }
            | ApiError::PreconditionFailed { code, .. }
            | ApiError::Locked { code, .. } => code,
            ApiError::ChecksumMismatch => "checksum_mismatch",
            ApiError::PastLength { .. } => "past_upload_length",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated
            | ApiError::TerminalRefused { .. }
            | ApiError::NotAuthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Forbidden | ApiError::Csrf | ApiError::TerminalNotApproved => {
                StatusCode::FORBIDDEN
            }
            ApiError::NotFound(_) | ApiError::NotPublished => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } | ApiError::QuotaExceeded(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyUploads(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NoMirror => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited | ApiError::Busy => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Token(shared::TokenError::Expired) => StatusCode::GONE,
            ApiError::Token(_) | ApiError::TokenMissing | ApiError::TokenWrongAsset => {
                StatusCode::FORBIDDEN
            }
            ApiError::NodeAuth(_) => StatusCode::UNAUTHORIZED,
            ApiError::Damaged => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InsufficientCredits { .. } | ApiError::PaymentRequired { .. } => {
                StatusCode::PAYMENT_REQUIRED
            }
            ApiError::Gone { .. } => StatusCode::GONE,
            ApiError::ChecksumMismatch => {
                StatusCode::from_u16(460).expect("460 is a valid status code")
            }
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::PastLength { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Locked { .. } => StatusCode::LOCKED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "code": self.code(), "message": self.to_string() } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!("internal error: {e:#}");
        }
        (self.status(), Json(self.body())).into_response()
    }
}

impl From<crate::quotas::QuotaError> for ApiError {
    fn from(e: crate::quotas::QuotaError) -> Self {
        match e {
            crate::quotas::QuotaError::Exceeded { .. } => ApiError::QuotaExceeded(e.to_string()),
            crate::quotas::QuotaError::NoSpace => ApiError::InsufficientStorage(e.to_string()),
            _ => ApiError::TooManyUploads(e.to_string()),
        }
    }
}

impl From<crate::quotas::BeginError> for ApiError {
    fn from(e: crate::quotas::BeginError) -> Self {
        match e {
            crate::quotas::BeginError::Quota(q) => q.into(),
            crate::quotas::BeginError::Db(e) => ApiError::Internal(e.into()),
        }
    }
}

impl From<crate::console::ConsoleError> for ApiError {
    fn from(e: crate::console::ConsoleError) -> Self {
        match e {
            crate::console::ConsoleError::NoSuchNode(_) => ApiError::NotFound("node"),
            crate::console::ConsoleError::NoSuchIncident(_) => ApiError::NotFound("incident"),
            crate::console::ConsoleError::NoSuchMovie(_) => ApiError::NotFound("asset"),
            crate::console::ConsoleError::NoSuchAccount(_) => ApiError::NotFound("account"),
            crate::console::ConsoleError::NotNow(m) => ApiError::Conflict {
                code: "not_now",
                message: m,
            },
            crate::console::ConsoleError::Invalid(m) => ApiError::BadRequest {
                code: "invalid_input",
                message: m.into(),
            },
            crate::console::ConsoleError::Db(e) => ApiError::Internal(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        auth::AuthError, ledger::LedgerError, limits::RateLimited, redirect::RedirectError,
    };

    /// A service's refusal reaches clients exactly as the API always said
    /// it (status, code, words), and a service error printed on its own
    /// (a CLI, a log) says the same words.
    #[test]
    fn service_errors_keep_the_api_codes_and_words() {
        let same = |service: String, mapped: ApiError, direct: ApiError| {
            assert_eq!(
                (mapped.status(), mapped.code(), mapped.to_string()),
                (direct.status(), direct.code(), direct.to_string())
            );
            assert_eq!(service, direct.to_string());
        };
        same(
            RateLimited.to_string(),
            RateLimited.into(),
            ApiError::RateLimited,
        );
        same(
            AuthError::Busy.to_string(),
            AuthError::Busy.into(),
            ApiError::Busy,
        );
        for (e, direct) in [
            (LedgerError::NoMirror, ApiError::NoMirror),
            (LedgerError::Damaged, ApiError::Damaged),
            (LedgerError::NotPublished, ApiError::NotPublished),
            (
                LedgerError::TerminalNotApproved,
                ApiError::TerminalNotApproved,
            ),
            (
                LedgerError::InsufficientCredits {
                    balance: 5,
                    price: 9,
                },
                ApiError::InsufficientCredits {
                    balance: 5,
                    price: 9,
                },
            ),
        ] {
            same(e.to_string(), e.into(), direct);
        }
        same(
            RedirectError::NoMirror.to_string(),
            RedirectError::NoMirror.into(),
            ApiError::NoMirror,
        );
        let paid: ApiError = RedirectError::PaymentRequired.into();
        assert_eq!(
            (paid.status(), paid.code()),
            (StatusCode::PAYMENT_REQUIRED, "payment_required")
        );
        let expired: ApiError = RedirectError::Token(shared::TokenError::Expired).into();
        assert_eq!(expired.status(), StatusCode::GONE);
    }
}
