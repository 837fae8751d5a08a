//! Who is calling: a browser session (cookie + CSRF token) or a script
//! (`Authorization: Bearer`); see `crate::auth` for passwords and tokens.

use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts},
};

use super::error::ApiError;
use crate::{
    auth::{ct_eq, token_hash},
    catalog, SharedState,
};

pub const SESSION_COOKIE: &str = "slm_session";
pub const LOGIN_CSRF_COOKIE: &str = "slm_login_csrf";

pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Set-Cookie` value: HttpOnly always, `Secure` when served over https,
/// `SameSite=Lax` so a cross-site form post carries no session.
pub fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    )
}

#[derive(Debug, Clone)]
pub struct Caller {
    pub user: catalog::User,
    /// The session's CSRF token; `None` for bearer-token callers, whose
    /// requests a browser cannot forge.
    pub csrf: Option<String>,
}

impl Caller {
    /// Cookie-authenticated state changes must carry the session's CSRF token.
    pub fn check_csrf(&self, presented: Option<&str>) -> Result<(), ApiError> {
        match &self.csrf {
            None => Ok(()),
            Some(expected) => match presented {
                Some(p) if ct_eq(p, expected) => Ok(()),
                _ => Err(ApiError::Csrf),
            },
        }
    }

    /// [`check_csrf`](Caller::check_csrf) for JSON calls: a session caller
    /// sends the token in `X-CSRF-Token`; bearer callers need none.
    pub fn check_csrf_header(&self, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        self.check_csrf(headers.get("x-csrf-token").and_then(|v| v.to_str().ok()))
    }
}

async fn resolve(parts: &Parts, st: &SharedState) -> Result<Option<Caller>, ApiError> {
    if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthenticated)?;
        return match st.db.api_token_user(&token_hash(token.trim())).await? {
            Some(user) => Ok(Some(Caller { user, csrf: None })),
            None => Err(ApiError::Unauthenticated),
        };
    }
    if let Some(tok) = cookie(&parts.headers, SESSION_COOKIE) {
        if let Some((user, csrf)) = st.db.session_user(&token_hash(tok)).await? {
            return Ok(Some(Caller {
                user,
                csrf: Some(csrf),
            }));
        }
    }
    Ok(None)
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        resolve(parts, st).await?.ok_or(ApiError::Unauthenticated)
    }
}

/// For pages that look different to visitors and to logged-in users.
pub struct MaybeCaller(pub Option<Caller>);

impl FromRequestParts<SharedState> for MaybeCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        match resolve(parts, st).await {
            Ok(c) => Ok(MaybeCaller(c)),
            Err(ApiError::Unauthenticated) => Ok(MaybeCaller(None)),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_is_required_for_cookie_callers_only() {
        let user = catalog::User {
            id: 1,
            email: "a@b".into(),
            password_hash: String::new(),
            role: crate::domain::Role::Uploader,
            disabled: false,
        };
        let browser = Caller {
            user: user.clone(),
            csrf: Some("tok".into()),
        };
        assert!(browser.check_csrf(Some("tok")).is_ok());
        assert!(matches!(
            browser.check_csrf(Some("tik")),
            Err(ApiError::Csrf)
        ));
        assert!(matches!(browser.check_csrf(None), Err(ApiError::Csrf)));
        let script = Caller { user, csrf: None };
        assert!(script.check_csrf(None).is_ok());
    }
}
