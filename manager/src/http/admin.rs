//! What operators read about the manager itself: its background workers
//! and its recent alerts (`crate::workers`, `crate::alerts`). Operators
//! only; anyone else gets `403 forbidden`.

use axum::Json;

use super::{error::ApiError, session::Caller};
use crate::{alerts, workers};

fn operator(c: &Caller) -> Result<(), ApiError> {
    if c.user.is_operator() {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

/// `GET /api/v1/admin/workers`: every background worker's status.
pub async fn workers(c: Caller) -> Result<Json<serde_json::Value>, ApiError> {
    operator(&c)?;
    Ok(Json(serde_json::json!({ "workers": workers::statuses() })))
}

/// `GET /api/v1/admin/alerts`: the alerts raised since start, newest last.
pub async fn alerts(c: Caller) -> Result<Json<serde_json::Value>, ApiError> {
    operator(&c)?;
    Ok(Json(serde_json::json!({ "alerts": alerts::recent() })))
}
