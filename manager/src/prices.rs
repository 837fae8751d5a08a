//! Prices and their epochs (docs/credits.md, "Price changes").
//!
//! A grant-less media URL handed out while a movie was free must stop
//! playing once the owner sets a price, also at the nodes, which check
//! tokens without calling the manager. Each asset has a price epoch that
//! goes up when it turns from free to paid; grant-less tokens carry the
//! epoch they were minted in. The manager refuses a stale one at once
//! ([`crate::redirect::check_epoch`]); nodes poll `Catalog::paid_epochs` (`crate::http::nodes`)
//! and refuse it too. Like every answer to a node, the list carries a MAC
//! bound to the node's own request (`shared::nodeauth`), so nobody on the
//! path can feed a node a forged or replayed one.

use crate::catalog;

/// Sets a view price (0 = free). A free movie turning paid enters a new
/// price epoch, which retires every grant-less media URL handed out before.
pub async fn set_price(
    db: &dyn catalog::Catalog,
    asset_id: &str,
    price: crate::domain::Price,
) -> sqlx::Result<()> {
    db.set_price(asset_id, price.get()).await
}
