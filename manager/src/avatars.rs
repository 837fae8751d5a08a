//! Avatars linked to accounts: a one-time code made on the web, said to an
//! in-world terminal, links the avatar (docs/terminal.md). A link never
//! moves silently to another account.

use crate::{auth, catalog};

/// How long a link code stays valid.
pub const LINK_CODE_SECS: i64 = 15 * 60;

/// Why a code did not link an avatar.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("this code is unknown, used or expired; get a new one on your account page")]
    CodeInvalid,
    #[error("this avatar is linked to another account; unlink it on that account's page first")]
    LinkedElsewhere,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A fresh code for `user_id` (replacing any earlier one): eight letters
/// and digits without look-alikes, short enough to type in chat. Only its
/// hash is stored.
pub async fn new_code(db: &dyn catalog::Catalog, user_id: i64) -> sqlx::Result<String> {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    let code: String = (0..8)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    db.replace_link_code(
        user_id,
        &auth::token_hash(&code),
        catalog::now() + LINK_CODE_SECS,
    )
    .await?;
    Ok(code)
}

/// Links `avatar` to the account that made `code`, at terminal `via`, and
/// consumes the code. An avatar linked to another account stays there
/// (`LinkedElsewhere`): only that account can unlink it, on the web.
pub async fn redeem_code(
    db: &dyn catalog::Catalog,
    code: &str,
    avatar: &str,
    via: &catalog::Terminal,
) -> Result<i64, LinkError> {
    let code_hash = auth::token_hash(&code.trim().to_uppercase());
    match db
        .link_avatar(&code_hash, avatar, &via.name, via.owner_id)
        .await?
    {
        catalog::LinkOutcome::Linked(user) => Ok(user),
        catalog::LinkOutcome::CodeInvalid => Err(LinkError::CodeInvalid),
        catalog::LinkOutcome::LinkedElsewhere => Err(LinkError::LinkedElsewhere),
    }
}
