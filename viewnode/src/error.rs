//! The node's one error type for HTTP answers: every rejection maps to a
//! status and a stable machine-readable code here, and nowhere else.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Token(#[from] shared::TokenError),
    #[error("{0}")]
    Auth(#[from] shared::NodeAuthError),
    #[error("this node holds no copy of that movie")]
    BlobMissing,
    #[error("the blob name is not a SHA-256 in hex")]
    BadBlobName,
    #[error("the received bytes do not match the blob name")]
    HashMismatch,
    #[error("the push was cut off before it finished")]
    BodyAborted,
    #[error("the movie's key cannot be unwrapped on this node")]
    KeyUnavailable,
    #[error("the stored copy is damaged and has been taken out of service")]
    Damaged,
    #[error("storage failure")]
    Storage(String),
    /// A grant-less token minted before the movie got a price.
    #[error("this movie now has a price: buy a view for a new media URL")]
    PaymentRequired,
    /// A manager call's body that does not read as what it should be.
    #[error("{0}")]
    BadRequest(String),
    /// One such task at a time; try again when it is done.
    #[error("{0}")]
    Busy(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    /// A push found no room; nothing was kept, the sender tries elsewhere.
    #[error("this node's disk is full; nothing was stored")]
    DiskFull,
    #[error("this node cannot record paid views right now (its disk is failing); ask for a new media URL to be sent to another mirror")]
    JournalFull,
}

impl NodeError {
    pub fn code(&self) -> &'static str {
        match self {
            NodeError::Token(e) => e.code(),
            NodeError::Auth(e) => e.code(),
            NodeError::BlobMissing => "blob_missing",
            NodeError::BadBlobName => "bad_blob_name",
            NodeError::HashMismatch => "hash_mismatch",
            NodeError::BodyAborted => "body_aborted",
            NodeError::KeyUnavailable => "key_unavailable",
            NodeError::Damaged => "blob_damaged",
            NodeError::Storage(_) => "storage_error",
            NodeError::PaymentRequired => "payment_required",
            NodeError::BadRequest(_) => "bad_request",
            NodeError::Busy(_) => "busy",
            NodeError::Forbidden(_) => "forbidden",
            NodeError::JournalFull => "journal_full",
            NodeError::DiskFull => "insufficient_storage",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            NodeError::Token(shared::TokenError::Expired) => StatusCode::GONE,
            NodeError::Token(_) => StatusCode::FORBIDDEN,
            NodeError::Auth(_) => StatusCode::UNAUTHORIZED,
            NodeError::BlobMissing => StatusCode::NOT_FOUND,
            NodeError::BadBlobName => StatusCode::BAD_REQUEST,
            NodeError::HashMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            NodeError::BodyAborted => StatusCode::BAD_REQUEST,
            NodeError::KeyUnavailable | NodeError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            NodeError::Damaged => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::PaymentRequired => StatusCode::PAYMENT_REQUIRED,
            NodeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            NodeError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            NodeError::Forbidden(_) => StatusCode::FORBIDDEN,
            NodeError::JournalFull => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
        }
    }
}

impl From<crate::store::StoreError> for NodeError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError as S;
        match e {
            S::HashMismatch { .. } => NodeError::HashMismatch,
            S::Body(_) => NodeError::BodyAborted,
            S::NotFound => NodeError::BlobMissing,
            S::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => NodeError::DiskFull,
            other => NodeError::Storage(other.to_string()),
        }
    }
}

impl IntoResponse for NodeError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code(), "{self:#}");
        } else {
            tracing::info!(code = self.code(), "rejected: {self}");
        }
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        (status, Json(body)).into_response()
    }
}
