//! What every catalog backend must do, as tests over the [`Catalog`] trait
//! alone: no SQL, no backend types. A backend runs the whole suite with
//! [`suite!`], given an expression that makes a fresh, empty catalog (and
//! a guard that removes it when dropped):
//!
//! ```ignore
//! crate::catalog::conformance::suite!(my_backend::fresh());
//! ```
//!
//! The SQLite backend runs it at the end of this file; PostgreSQL will run
//! it the same way. Concurrency checks run on a multi-thread runtime so
//! racing writers really race.

use super::*;
use shared::protocol::JournalEvent;

/// One `#[tokio::test]` per check, each on a fresh catalog from `$make`
/// (an expression giving a future of `(guard, SharedCatalog)`).
macro_rules! suite {
    ($make:expr) => {
        $crate::catalog::conformance::suite!(@each $make;
            accounts_sessions_and_tokens,
            a_job_is_claimed_once_and_again_only_after_its_lease_runs_out,
            a_cancel_racing_the_move_to_sealing_wins,
            a_job_taken_over_refuses_every_write_of_its_old_holder,
            transcode_workers_register_once_per_token_and_claim_jobs_by_id,
            failed_jobs_back_off_and_cancel_and_retry_follow_the_state,
            copies_publish_a_movie_and_their_loss_damages_it,
            purchases_charge_once_and_refusals_change_nothing,
            racing_purchases_for_one_balance_succeed_once,
            terminal_purchases_need_consent_and_keep_to_the_cap,
            operator_grants_credit_once_per_key,
            uploads_are_charged_with_their_row_and_refunded_once,
            the_journal_applies_once_and_unplayed_grants_are_refunded_once,
            a_restore_freezes_refunds_that_could_depend_on_lost_views,
            terminals_nonces_and_avatar_links,
            a_snapshot_holds_what_the_catalog_held,
            the_console_reads_accounts_counts_and_an_append_only_audit_log,
            the_monitor_keeps_states_days_and_changes,
            incidents_deliveries_and_drains,
            withdrawals_priorities_and_disabled_accounts,
            owners_take_turns_in_the_queue_and_usage_is_counted,
            the_home_page_pages_by_keyset_and_searches_titles);
    };
    (@each $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (_guard, catalog) = $make.await;
                $crate::catalog::conformance::$check(&catalog).await;
            }
        )*
    };
}
pub(crate) use suite;

fn refused<T: std::fmt::Debug>(r: Result<T, TxError>) -> Refused {
    match r {
        Err(TxError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn account(c: &SharedCatalog, email: &str, bonus: i64) -> i64 {
    c.create_account(email, "hash", Role::Uploader, bonus)
        .await
        .unwrap()
}

/// A published movie with a price, owned by `owner`, held verified on `utah`.
async fn published(c: &SharedCatalog, id: &str, owner: i64, price: i64) {
    c.insert_asset(id, owner, id, "m.mp4", 10).await.unwrap();
    c.record_sealed(
        id,
        "test",
        &format!("b{id}"),
        100,
        90,
        b"k",
        &["utah".into()],
    )
    .await
    .unwrap();
    c.replica_verified(id, "utah").await.unwrap();
    assert!(c.publish_if_replicated(id, 1).await.unwrap());
    c.set_price(id, price).await.unwrap();
}

/// The home page's listing: newest first, a page after another by keyset
/// (ties in time broken by id), titles searched in any case with `%` and
/// `_` taken as themselves; only published movies.
pub(crate) async fn the_home_page_pages_by_keyset_and_searches_titles(c: &SharedCatalog) {
    let owner = account(c, "owner@example.com", 0).await;
    for id in ["Alpha", "beta_1", "betaX1", "Gamma 100%", "delta"] {
        published(c, id, owner, 0).await;
    }
    c.insert_asset("hidden", owner, "beta_1 too", "m.mp4", 10)
        .await
        .unwrap();
    let ids = |v: Vec<Asset>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = c.published_page(after.clone(), None, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        let last = page.last().unwrap();
        after = Some((last.created_at, last.id.clone()));
        all.extend(ids(page));
    }
    let mut expected: Vec<(i64, String)> = Vec::new();
    for id in &all {
        expected.push((c.asset(id).await.unwrap().unwrap().created_at, id.clone()));
    }
    let mut sorted = expected.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(expected, sorted, "newest first, ties by id");
    assert_eq!(all.len(), 5, "{all:?}");
    assert_eq!(
        ids(c.published_page(None, Some("BETA_"), 10).await.unwrap()),
        ["beta_1"]
    );
    assert_eq!(
        ids(c.published_page(None, Some("100%"), 10).await.unwrap()),
        ["Gamma 100%"]
    );
    assert!(c
        .published_page(None, Some("nothing like it"), 10)
        .await
        .unwrap()
        .is_empty());

    // "My movies": each with its copies, views sold and earnings, paged
    // like the home page; the ledger paged by entry.
    c.set_price("Alpha", 10).await.unwrap();
    let buyer = account(c, "buyer@example.com", 50).await;
    c.purchase(&order(buyer, "Alpha", "r1", "g1", None))
        .await
        .unwrap();
    let mut mine = Vec::new();
    let mut after = None;
    loop {
        let page = c.owner_movies(owner, after.clone(), 4).await.unwrap();
        if page.is_empty() {
            break;
        }
        let last = page.last().unwrap();
        after = Some((last.created_at, last.id.clone()));
        mine.extend(page);
    }
    assert_eq!(mine.len(), 6, "the five published and the one in the queue");
    let alpha = mine.iter().find(|m| m.id == "Alpha").unwrap();
    assert_eq!(
        (alpha.copies, alpha.views, alpha.earned, alpha.price),
        (1, 1, 7, 10)
    );
    let hidden = mine.iter().find(|m| m.id == "hidden").unwrap();
    assert_eq!(
        (hidden.state, hidden.copies, hidden.views),
        (AssetState::Queued, 0, 0)
    );
    let first = c.history_page(buyer, None, 1).await.unwrap();
    assert_eq!(first[0].kind, "purchase");
    let second = c.history_page(buyer, Some(first[0].id), 1).await.unwrap();
    assert_eq!(second[0].kind, "signup_bonus");
    assert!(c
        .history_page(buyer, Some(second[0].id), 1)
        .await
        .unwrap()
        .is_empty());
}

fn order<'a>(
    buyer: i64,
    asset_id: &'a str,
    request_key: &'a str,
    grant_id: &'a str,
    terminal_owner: Option<i64>,
) -> PurchaseOrder<'a> {
    PurchaseOrder {
        buyer,
        asset_id,
        request_key,
        grant_id,
        source: if terminal_owner.is_some() {
            "terminal"
        } else {
            "web"
        },
        terminal_owner,
        uploader_share_percent: 70,
        window_secs: 3600,
        cap_window_secs: 24 * 3600,
        now: now(),
    }
}

async fn books_exact(c: &SharedCatalog) {
    assert_eq!(
        c.verify_balances().await.unwrap(),
        vec![],
        "every balance equals its ledger sum"
    );
}

pub async fn accounts_sessions_and_tokens(c: &SharedCatalog) {
    let a = c
        .create_account("a@example.com", "h1", Role::Operator, 500)
        .await
        .unwrap();
    assert_eq!(
        refused(
            c.create_account("a@example.com", "h2", Role::Uploader, 500)
                .await
        ),
        Refused::EmailTaken
    );
    assert_eq!(c.balance(a).await.unwrap(), 500, "the bonus, once");
    let u = c.user_by_email("a@example.com").await.unwrap().unwrap();
    assert_eq!(
        (u.id, u.role, u.password_hash.as_str()),
        (a, Role::Operator, "h1")
    );
    assert!(c.set_password("a@example.com", "h3").await.unwrap());
    assert!(!c.set_password("nobody@example.com", "h3").await.unwrap());

    c.insert_session("s1", a, "csrf1", now() + 60)
        .await
        .unwrap();
    c.insert_session("old", a, "csrf2", now() - 1)
        .await
        .unwrap();
    let (who, csrf) = c.session_user("s1").await.unwrap().unwrap();
    assert_eq!((who.id, csrf.as_str()), (a, "csrf1"));
    assert!(c.session_user("old").await.unwrap().is_none(), "expired");
    c.delete_session("s1").await.unwrap();
    assert!(c.session_user("s1").await.unwrap().is_none());

    c.insert_api_token("t1", a, "cli").await.unwrap();
    assert_eq!(c.api_token_user("t1").await.unwrap().unwrap().id, a);
    assert!(c.api_token_user("t2").await.unwrap().is_none());
    c.health_check().await.unwrap();
    books_exact(c).await;
}

pub async fn a_job_is_claimed_once_and_again_only_after_its_lease_runs_out(c: &SharedCatalog) {
    let owner = account(c, "a@example.com", 0).await;
    c.insert_asset("one", owner, "One", "one.mp4", 10)
        .await
        .unwrap();
    c.insert_asset("two", owner, "Two", "two.mp4", 10)
        .await
        .unwrap();
    // Claimers racing: each job goes to one of them.
    let claims: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.claim_next(30, "test").await.unwrap().map(|a| a.id) })
        })
        .collect();
    let mut got = Vec::new();
    for t in claims {
        got.extend(t.await.unwrap());
    }
    got.sort();
    assert_eq!(
        got,
        vec!["one", "two"],
        "two workers never get the same job"
    );
    assert!(c.claim_next(30, "test").await.unwrap().is_none());
    // A worker that died: a job claimed with a lease already run out is
    // taken again.
    c.insert_asset("three", owner, "Three", "t.mp4", 10)
        .await
        .unwrap();
    assert_eq!(c.claim_next(-1, "test").await.unwrap().unwrap().id, "three");
    assert_eq!(c.claim_next(30, "test").await.unwrap().unwrap().id, "three");
    assert!(
        !c.renew_lease("three", "test", 30).await.unwrap(),
        "no cancel asked"
    );
}

pub async fn transcode_workers_register_once_per_token_and_claim_jobs_by_id(c: &SharedCatalog) {
    let far = now() + 3600;
    c.insert_transcoder_token("h1", far, "op").await.unwrap();
    c.insert_transcoder_token("h2", far, "op").await.unwrap();
    c.insert_transcoder_token("old", now() - 1, "op")
        .await
        .unwrap();
    assert_eq!(
        c.register_transcoder("old", "w1", b"s").await.unwrap(),
        RegisterOutcome::TokenInvalid,
        "an expired token"
    );
    assert_eq!(
        c.register_transcoder("h1", "w1", b"s1").await.unwrap(),
        RegisterOutcome::Registered
    );
    assert_eq!(
        c.register_transcoder("h1", "w2", b"s").await.unwrap(),
        RegisterOutcome::TokenInvalid,
        "a token is good once"
    );
    assert!(!c.transcoder_token_live("h1").await.unwrap());
    // A live name is not replaced, and the token survives the refusal.
    assert_eq!(
        c.register_transcoder("h2", "w1", b"other").await.unwrap(),
        RegisterOutcome::NameTaken
    );
    let w = c.transcoder("w1").await.unwrap().unwrap();
    assert_eq!(
        (w.wrapped_secret.as_slice(), w.registered_by.as_str()),
        (&b"s1"[..], "op")
    );
    c.transcoder_seen("w1").await.unwrap();
    assert!(c
        .transcoder("w1")
        .await
        .unwrap()
        .unwrap()
        .last_seen_at
        .is_some());
    assert!(c.revoke_transcoder("w1").await.unwrap());
    assert!(!c.revoke_transcoder("w1").await.unwrap(), "revoked once");
    assert!(!c.revoke_transcoder("nobody").await.unwrap());
    // A revoked name registers again, with its new secret.
    assert_eq!(
        c.register_transcoder("h2", "w1", b"s2").await.unwrap(),
        RegisterOutcome::Registered
    );
    let w = c.transcoder("w1").await.unwrap().unwrap();
    assert_eq!(
        (w.wrapped_secret.as_slice(), w.revoked_at),
        (&b"s2"[..], None)
    );
    assert_eq!(c.transcoders().await.unwrap().len(), 1);

    // Jobs: offered in claim_next's order, claimed by id once.
    let owner = account(c, "a@example.com", 0).await;
    assert_eq!(c.next_job_id().await.unwrap(), None);
    c.insert_asset("one", owner, "One", "one.mp4", 10)
        .await
        .unwrap();
    c.insert_asset("two", owner, "Two", "two.mp4", 10)
        .await
        .unwrap();
    assert_eq!(c.next_job_id().await.unwrap().as_deref(), Some("one"));
    let claims: Vec<_> = (0..4)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                c.claim_job("one", 30, &format!("runner/w{i}#0"))
                    .await
                    .unwrap()
                    .map(|a| a.worker)
            })
        })
        .collect();
    let mut won = Vec::new();
    for t in claims {
        won.extend(t.await.unwrap());
    }
    assert_eq!(won.len(), 1, "one claim wins: {won:?}");
    let winner = won[0].clone().unwrap();
    let name = &winner[..winner.find('#').unwrap() + 1];
    assert_eq!(c.jobs_held(name).await.unwrap(), 1);
    assert_eq!(c.jobs_held("runner/x#").await.unwrap(), 0);
    assert_eq!(c.asset("one").await.unwrap().unwrap().worker, won[0]);
    assert_eq!(c.next_job_id().await.unwrap().as_deref(), Some("two"));
    assert!(c.claim_job("nope", 30, "w").await.unwrap().is_none());
    // A lapsed lease makes the job claimable by id again.
    let holder = won[0].clone().unwrap();
    c.renew_lease("one", &holder, -1).await.unwrap();
    assert_eq!(
        c.jobs_held(name).await.unwrap(),
        0,
        "a lapsed lease is not held"
    );
    let again = c
        .claim_job("one", 30, "runner/w9#1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.worker.as_deref(), Some("runner/w9#1"));
    assert!(matches!(
        c.renew_lease("one", &holder, 30).await,
        Err(sqlx::Error::RowNotFound)
    ));
    // A manager restarting requeues its own jobs cut short, never one a
    // transcode worker (a process of its own) is still doing.
    let local = c
        .claim_next(30, "host/transcode-1#abc")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(local.id, "two");
    assert_eq!(c.requeue_interrupted().await.unwrap(), 1);
    assert_eq!(
        c.asset("one").await.unwrap().unwrap().state,
        crate::domain::AssetState::Probing
    );
    assert_eq!(
        c.asset("two").await.unwrap().unwrap().state,
        crate::domain::AssetState::Queued
    );
}

pub async fn a_job_taken_over_refuses_every_write_of_its_old_holder(c: &SharedCatalog) {
    let owner = account(c, "a@example.com", 0).await;
    c.insert_asset("f", owner, "F", "f.mp4", 10).await.unwrap();
    // The old holder's lease lapses (a frozen process); another claims.
    assert_eq!(c.claim_next(-1, "old").await.unwrap().unwrap().id, "f");
    assert_eq!(c.claim_next(30, "new").await.unwrap().unwrap().id, "f");
    c.set_state("f", "new", AssetState::Transcoding)
        .await
        .unwrap();
    let lost = |r: sqlx::Result<()>| matches!(r, Err(sqlx::Error::RowNotFound));
    // Whatever the old holder does when it wakes changes nothing.
    assert!(matches!(
        c.renew_lease("f", "old", 30).await,
        Err(sqlx::Error::RowNotFound)
    ));
    assert!(lost(c.set_state("f", "old", AssetState::Probing).await));
    assert!(lost(c.set_media_info("f", "old", 1, 1, 1.0).await));
    assert!(matches!(
        c.start_sealing("f", "old").await,
        Err(sqlx::Error::RowNotFound)
    ));
    assert!(lost(
        c.record_sealed("f", "old", "bold", 10, 9, b"k", &["utah".into()])
            .await
    ));
    assert!(lost(c.requeue("f", "old").await));
    assert!(matches!(
        c.retry_later("f", "old", 60).await,
        Err(sqlx::Error::RowNotFound)
    ));
    assert!(lost(c.reject("f", "old", "not_media", "x").await));
    let f = c.asset("f").await.unwrap().unwrap();
    assert_eq!(f.state, AssetState::Transcoding);
    assert!(f.blob_id.is_none() && f.error_code.is_none());
    assert!(c.replicas("f").await.unwrap().is_empty());
    assert!(
        c.claim_next(30, "third").await.unwrap().is_none(),
        "still held"
    );
    // The new holder goes on.
    assert!(!c.renew_lease("f", "new", 30).await.unwrap());
    assert!(c.start_sealing("f", "new").await.unwrap());
    c.record_sealed("f", "new", "bnew", 10, 9, b"k", &["utah".into()])
        .await
        .unwrap();
    let f = c.asset("f").await.unwrap().unwrap();
    assert_eq!(
        (f.state, f.blob_id.as_deref()),
        (AssetState::Replicating, Some("bnew"))
    );
}

pub async fn a_cancel_racing_the_move_to_sealing_wins(c: &SharedCatalog) {
    let owner = account(c, "a@example.com", 0).await;
    c.insert_asset("s", owner, "S", "s.mp4", 10).await.unwrap();
    c.claim_next(30, "test").await.unwrap().unwrap();
    c.set_state("s", "test", AssetState::Transcoding)
        .await
        .unwrap();
    // The worker's last look finds no cancel; the uploader's cancel lands
    // right after and is told "requested".
    assert!(!c.cancel_requested("s").await.unwrap());
    assert_eq!(
        c.request_cancel("s").await.unwrap(),
        CancelOutcome::Requested
    );
    // So the move to sealing must not happen.
    assert!(!c.start_sealing("s", "test").await.unwrap());
    assert_eq!(
        c.asset("s").await.unwrap().unwrap().state,
        AssetState::Transcoding
    );
    // Without a cancel it does, and a cancel after it is too late.
    c.insert_asset("t", owner, "T", "t.mp4", 10).await.unwrap();
    assert_eq!(c.claim_next(30, "test").await.unwrap().unwrap().id, "t");
    c.set_state("t", "test", AssetState::Transcoding)
        .await
        .unwrap();
    assert!(c.start_sealing("t", "test").await.unwrap());
    assert_eq!(c.request_cancel("t").await.unwrap(), CancelOutcome::TooLate);
}

pub async fn failed_jobs_back_off_and_cancel_and_retry_follow_the_state(c: &SharedCatalog) {
    let owner = account(c, "a@example.com", 0).await;
    c.insert_asset("j", owner, "J", "j.mp4", 10).await.unwrap();
    c.claim_next(30, "test").await.unwrap().unwrap();
    assert_eq!(c.retry_later("j", "test", 60).await.unwrap(), 1);
    assert!(
        c.claim_next(30, "test").await.unwrap().is_none(),
        "not due for a minute"
    );
    // Queued: cancelled at once. Running: a request the worker sees.
    c.insert_asset("q", owner, "Q", "q.mp4", 10).await.unwrap();
    assert_eq!(
        c.request_cancel("q").await.unwrap(),
        CancelOutcome::Cancelled
    );
    let q = c.asset("q").await.unwrap().unwrap();
    assert_eq!(
        (q.state, q.error_code.as_deref()),
        (AssetState::Rejected, Some("cancelled"))
    );
    c.insert_asset("r", owner, "R", "r.mp4", 10).await.unwrap();
    assert_eq!(c.claim_next(30, "test").await.unwrap().unwrap().id, "r");
    assert_eq!(
        c.request_cancel("r").await.unwrap(),
        CancelOutcome::Requested
    );
    assert!(c.renew_lease("r", "test", 30).await.unwrap());
    c.set_state("r", "test", AssetState::Replicating)
        .await
        .unwrap();
    assert_eq!(c.request_cancel("q").await.unwrap(), CancelOutcome::TooLate);
    // Only processing_failed is retried by an operator.
    assert!(!c.retry_failed("q").await.unwrap());
    c.reject("j", "test", "processing_failed", "x")
        .await
        .unwrap();
    assert!(c.retry_failed("j").await.unwrap());
    let j = c.asset("j").await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts, j.error_code),
        (AssetState::Queued, 0, None)
    );
}

pub async fn copies_publish_a_movie_and_their_loss_damages_it(c: &SharedCatalog) {
    let owner = account(c, "a@example.com", 0).await;
    let nodes = ["utah".to_string(), "toronto".to_string()];
    c.insert_asset("m", owner, "M", "m.mp4", 10).await.unwrap();
    c.record_sealed("m", "test", "bm", 100, 90, b"key", &nodes)
        .await
        .unwrap();
    let m = c.asset("m").await.unwrap().unwrap();
    assert_eq!(
        (m.state, m.blob_id.as_deref(), m.sealed_len),
        (AssetState::Replicating, Some("bm"), Some(100))
    );
    let states = |r: Vec<Replica>| r.into_iter().map(|r| r.state).collect::<Vec<_>>();
    assert_eq!(
        states(c.replicas("m").await.unwrap()),
        vec![ReplicaState::Pending, ReplicaState::Pending]
    );
    assert!(
        !c.publish_if_replicated("m", 2).await.unwrap(),
        "no copy yet"
    );
    c.replica_verified("m", "utah").await.unwrap();
    c.replica_failed("m", "toronto", "refused", now() + 60)
        .await
        .unwrap();
    assert!(
        !c.publish_if_replicated("m", 2).await.unwrap(),
        "one of two"
    );
    assert!(!c.all_verified("m").await.unwrap());
    c.replica_verified("m", "toronto").await.unwrap();
    assert!(c.publish_if_replicated("m", 2).await.unwrap());
    assert!(c.all_verified("m").await.unwrap());
    assert_eq!(
        c.published_assets(10).await.unwrap()[0].id,
        "m",
        "listed once published"
    );
    assert!(c.referenced_blobs().await.unwrap().contains("bm"));
    // Both copies lost: the movie is damaged, and back when one returns.
    let later = now() + 10;
    assert!(c.replica_lost("m", "utah", "gone", later).await.unwrap());
    assert!(
        !c.mark_damaged("m").await.unwrap(),
        "toronto still holds it"
    );
    assert!(c.replica_lost("m", "toronto", "gone", later).await.unwrap());
    assert!(c.mark_damaged("m").await.unwrap());
    assert_eq!(
        c.asset("m").await.unwrap().unwrap().state,
        AssetState::Damaged
    );
    c.replica_verified("m", "utah").await.unwrap();
    assert!(c.undamage("m").await.unwrap());
    assert_eq!(
        c.asset("m").await.unwrap().unwrap().state,
        AssetState::Replicating,
        "back to replicating, published again by the usual rule"
    );
    assert!(c.publish_if_replicated("m", 1).await.unwrap());
}

pub async fn purchases_charge_once_and_refusals_change_nothing(c: &SharedCatalog) {
    let seller = account(c, "s@example.com", 0).await;
    let buyer = account(c, "b@example.com", 25).await;
    published(c, "m", seller, 10).await;
    let first = c.purchase(&order(buyer, "m", "b:1", "g1", None)).await;
    assert!(
        matches!(
            first,
            Ok(PurchaseOutcome::Charged {
                price: 10,
                balance: 15,
                ..
            })
        ),
        "{first:?}"
    );
    assert_eq!(c.balance(seller).await.unwrap(), 7, "70 % share");
    // The same request again: the books refuse a second grant.
    assert_eq!(
        refused(c.purchase(&order(buyer, "m", "b:1", "g2", None)).await),
        Refused::Duplicate
    );
    let g = c.grant_by_request("b:1").await.unwrap().unwrap();
    assert_eq!(
        (g.id.as_str(), g.asset_id.as_str(), g.price),
        ("g1", "m", 10)
    );
    assert!(c.grant_view("g2").await.unwrap().is_none(), "rolled back");
    c.purchase(&order(buyer, "m", "b:2", "g3", None))
        .await
        .unwrap();
    assert_eq!(
        refused(c.purchase(&order(buyer, "m", "b:3", "g4", None)).await),
        Refused::Insufficient {
            balance: 5,
            needed: 10
        }
    );
    assert_eq!(
        refused(c.purchase(&order(buyer, "nope", "b:4", "g5", None)).await),
        Refused::NoMovie
    );
    c.insert_asset("q", seller, "Q", "q.mp4", 1).await.unwrap();
    assert_eq!(
        refused(c.purchase(&order(buyer, "q", "b:5", "g6", None)).await),
        Refused::NotPublished
    );
    // Free, and the seller's own: nothing charged, no grant.
    published(c, "free", seller, 0).await;
    assert_eq!(
        c.purchase(&order(buyer, "free", "b:6", "g7", None))
            .await
            .unwrap(),
        PurchaseOutcome::Free { balance: 5 }
    );
    assert_eq!(
        c.purchase(&order(seller, "m", "s:1", "g8", None))
            .await
            .unwrap(),
        PurchaseOutcome::Free { balance: 14 }
    );
    assert_eq!(c.balance(buyer).await.unwrap(), 5);
    assert_eq!(c.grant_buyer("g1").await.unwrap(), Some(buyer));
    let h = c.history(buyer, 10).await.unwrap();
    assert_eq!(
        h.iter()
            .map(|e| (e.kind.as_str(), e.amount))
            .collect::<Vec<_>>(),
        vec![("purchase", -10), ("purchase", -10), ("signup_bonus", 25)]
    );
    books_exact(c).await;
}

pub async fn racing_purchases_for_one_balance_succeed_once(c: &SharedCatalog) {
    let seller = account(c, "s@example.com", 0).await;
    let buyer = account(c, "b@example.com", 15).await;
    published(c, "m", seller, 10).await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let (key, grant) = (format!("b:{i}"), format!("g{i}"));
                c.purchase(&order(buyer, "m", &key, &grant, None)).await
            })
        })
        .collect();
    let mut charged = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(PurchaseOutcome::Charged { .. }) => charged += 1,
            Err(TxError::Refused(Refused::Insufficient { .. })) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(charged, 1);
    assert_eq!(c.balance(buyer).await.unwrap(), 5);
    books_exact(c).await;
}

pub async fn terminal_purchases_need_consent_and_keep_to_the_cap(c: &SharedCatalog) {
    let seller = account(c, "s@example.com", 0).await;
    let owner = account(c, "o@example.com", 0).await;
    let buyer = account(c, "b@example.com", 100).await;
    published(c, "m", seller, 10).await;
    let t = Some(owner);
    assert_eq!(
        refused(c.purchase(&order(buyer, "m", "b:1", "g1", t)).await),
        Refused::NotApproved
    );
    assert!(c.approval(buyer, owner, 0).await.unwrap().is_none());
    c.approve(buyer, owner, 15, "Lobby").await.unwrap();
    c.purchase(&order(buyer, "m", "b:2", "g2", t))
        .await
        .unwrap();
    let a = c
        .approval(buyer, owner, now() - 3600)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (a.daily_cap, a.spent_24h, a.via_terminal.as_str()),
        (15, 10, "Lobby")
    );
    assert_eq!(
        refused(c.purchase(&order(buyer, "m", "b:3", "g3", t)).await),
        Refused::CapReached { cap: 15 }
    );
    // A changed cap, not a second approval.
    c.approve(buyer, owner, 20, "Lobby").await.unwrap();
    assert_eq!(c.approvals(buyer, 0).await.unwrap().len(), 1);
    c.purchase(&order(buyer, "m", "b:4", "g4", t))
        .await
        .unwrap();
    assert!(c.revoke(buyer, owner).await.unwrap());
    assert!(!c.revoke(buyer, owner).await.unwrap());
    assert_eq!(
        refused(c.purchase(&order(buyer, "m", "b:5", "g5", t)).await),
        Refused::NotApproved
    );
    assert_eq!(c.balance(buyer).await.unwrap(), 80);
    books_exact(c).await;
}

pub async fn operator_grants_credit_once_per_key(c: &SharedCatalog) {
    let a = account(c, "a@example.com", 0).await;
    let b = account(c, "b@example.com", 0).await;
    let everyone = Recipients::CreatedBefore(now() + 10);
    let grant = |key: &'static str| GrantOrder {
        to: &everyone,
        amount: 50,
        actor: "operator:o",
        reason: "outage",
        key,
    };
    assert_eq!(c.grant_credits(&grant("k1")).await.unwrap(), vec![a, b]);
    assert!(
        c.grant_credits(&grant("k1")).await.unwrap().is_empty(),
        "the same key grants once"
    );
    assert_eq!(c.grant_credits(&grant("k2")).await.unwrap(), vec![a, b]);
    let one = Recipients::Account(a);
    let to_a = GrantOrder {
        to: &one,
        amount: crate::domain::MAX_BALANCE,
        actor: "operator:o",
        reason: "too much",
        key: "k3",
    };
    assert_eq!(refused(c.grant_credits(&to_a).await), Refused::TooRich);
    let nobody = Recipients::Account(9999);
    let to_nobody = GrantOrder {
        to: &nobody,
        ..to_a
    };
    assert_eq!(
        refused(c.grant_credits(&to_nobody).await),
        Refused::NoAccount
    );
    assert_eq!(c.balance(a).await.unwrap(), 100);
    let h = c.history(a, 1).await.unwrap();
    assert_eq!(
        (h[0].kind.as_str(), h[0].actor.as_str()),
        ("grant", "operator:o")
    );
    books_exact(c).await;
}

pub async fn uploads_are_charged_with_their_row_and_refunded_once(c: &SharedCatalog) {
    let a = account(c, "a@example.com", 25).await;
    let new = |id: &'static str| NewAsset {
        id,
        owner: a,
        title: id,
        source_name: "m.mp4",
        source_bytes: 1,
    };
    c.insert_asset_paid(&new("m1"), 10).await.unwrap();
    c.insert_asset_paid(&new("m2"), 10).await.unwrap();
    assert_eq!(
        refused(c.insert_asset_paid(&new("m3"), 10).await),
        Refused::Insufficient {
            balance: 5,
            needed: 10
        }
    );
    assert!(c.asset("m3").await.unwrap().is_none(), "no unpaid row");
    c.reject("m1", "test", "not_media", "x").await.unwrap();
    let due = c.unrefunded_rejected_uploads(10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].id.as_str(), due[0].cost), ("m1", 10));
    assert!(c.refund_upload(&due[0], "rejected").await.unwrap());
    assert!(!c.refund_upload(&due[0], "rejected").await.unwrap(), "once");
    assert!(c.unrefunded_rejected_uploads(10).await.unwrap().is_empty());
    c.insert_asset_paid(&new("m4"), 0).await.unwrap();
    assert_eq!(c.balance(a).await.unwrap(), 15);
    assert_eq!(c.assets_of(a, 10).await.unwrap().len(), 3);
    books_exact(c).await;
}

fn event(id: &str, grant: Option<&str>, asset: &str, bytes: u64, at: i64) -> JournalEvent {
    JournalEvent {
        id: id.into(),
        grant: grant.map(Into::into),
        asset: asset.into(),
        bytes,
        first_at: at,
        last_at: at,
    }
}

pub async fn the_journal_applies_once_and_unplayed_grants_are_refunded_once(c: &SharedCatalog) {
    let seller = account(c, "s@example.com", 0).await;
    let buyer = account(c, "b@example.com", 100).await;
    published(c, "m", seller, 10).await;
    let mut o = order(buyer, "m", "b:1", "watched", None);
    o.window_secs = 0;
    c.purchase(&o).await.unwrap();
    let mut o = order(buyer, "m", "b:2", "unwatched", None);
    o.window_secs = 0;
    c.purchase(&o).await.unwrap();
    assert_eq!(c.balance(seller).await.unwrap(), 14);

    let t = now();
    let batch = [
        event("e1", Some("watched"), "m", 500, t),
        event("e2", None, "m", 100, t),
    ];
    let done = c.apply_journal("utah", &batch, t - 5, t).await.unwrap();
    assert_eq!(done.applied, 2);
    let again = c.apply_journal("utah", &batch, t - 9, t).await.unwrap();
    assert_eq!(again.applied, 0, "each event once");
    assert_eq!(
        c.grant_view("watched").await.unwrap().unwrap().bytes_served,
        500
    );
    assert_eq!(
        c.journal_watermarks().await.unwrap(),
        vec![("utah".to_string(), t - 5)],
        "a watermark never goes back"
    );

    let due = c.unserved_grants_due(t + 1, 0, 10).await.unwrap();
    assert_eq!(due, vec!["unwatched".to_string()], "only what nobody saw");
    // The seller spent most of the share meanwhile: the reversal takes
    // what is left and the site absorbs the rest.
    published(c, "n", buyer, 10).await;
    c.purchase(&order(seller, "n", "s:1", "spend", None))
        .await
        .unwrap();
    assert_eq!(c.balance(seller).await.unwrap(), 4);
    let r = c.refund_grant("unwatched").await.unwrap().unwrap();
    assert_eq!((r.buyer, r.price, r.absorbed), (buyer, 10, 3));
    assert!(c.refund_grant("unwatched").await.unwrap().is_none(), "once");
    assert!(
        c.refund_grant("watched").await.unwrap().is_none(),
        "it played"
    );
    assert_eq!(c.balance(buyer).await.unwrap(), 100 - 20 + 7 + 10);
    assert_eq!(c.balance(seller).await.unwrap(), 0);
    // A node that serves the refunded grant after all: kept apart, reported.
    let late = c
        .apply_journal("utah", &[event("e3", Some("unwatched"), "m", 7, t)], t, t)
        .await
        .unwrap();
    assert_eq!(late.applied, 1);
    assert_eq!(late.after_refund, vec![("unwatched".to_string(), 7)]);
    assert_eq!(
        c.grant_view("unwatched")
            .await
            .unwrap()
            .unwrap()
            .bytes_served,
        0
    );
    books_exact(c).await;

    // Retention: old events go, the grants' totals stay, and an event
    // that arrived after its refund stays as the evidence of it.
    assert_eq!(c.prune_view_events(t).await.unwrap(), 0, "none older");
    assert_eq!(c.prune_view_events(t + 1).await.unwrap(), 2);
    assert_eq!(c.prune_view_events(t + 1).await.unwrap(), 0);
    let resent = [event("e3", Some("unwatched"), "m", 7, t)];
    assert_eq!(
        c.apply_journal("utah", &resent, t, t)
            .await
            .unwrap()
            .applied,
        0
    );
    assert_eq!(
        c.grant_view("watched").await.unwrap().unwrap().bytes_served,
        500
    );
}

pub async fn a_restore_freezes_refunds_that_could_depend_on_lost_views(c: &SharedCatalog) {
    let seller = account(c, "s@example.com", 0).await;
    let buyer = account(c, "b@example.com", 100).await;
    published(c, "m", seller, 10).await;
    let mut o = order(buyer, "m", "b:1", "g1", None);
    o.window_secs = 0;
    c.purchase(&o).await.unwrap();
    let t = now();
    c.apply_journal("utah", &[], t - 100, t).await.unwrap();
    // Restored from a backup taken now: the grant may have been watched
    // in the gap; it is never refunded automatically.
    c.freeze_refunds(t, t + 1).await.unwrap();
    assert_eq!(c.restores_after(t).await.unwrap(), 1);
    assert_eq!(c.restores_after(t + 1).await.unwrap(), 0);
    assert!(c
        .unserved_grants_due(t + 10, 0, 10)
        .await
        .unwrap()
        .is_empty());
}

pub async fn terminals_nonces_and_avatar_links(c: &SharedCatalog) {
    let owner = account(c, "o@example.com", 0).await;
    let other = account(c, "x@example.com", 0).await;
    c.insert_terminal("t1", owner, "Lobby", b"wrapped")
        .await
        .unwrap();
    let t = c.terminal("t1").await.unwrap().unwrap();
    assert_eq!(
        (t.owner_id, t.name.as_str(), &t.wrapped_secret[..]),
        (owner, "Lobby", &b"wrapped"[..])
    );
    assert!(c.use_terminal_nonce("t1", "n1", 300).await.unwrap());
    assert!(
        !c.use_terminal_nonce("t1", "n1", 300).await.unwrap(),
        "a replay"
    );
    assert!(c
        .terminal("t1")
        .await
        .unwrap()
        .unwrap()
        .last_used_at
        .is_some());
    assert!(!c.delete_terminal("t1", other).await.unwrap(), "not theirs");
    assert_eq!(c.terminals_of(owner).await.unwrap().len(), 1);

    c.replace_link_code(owner, "code1", now() + 60)
        .await
        .unwrap();
    c.replace_link_code(other, "code2", now() + 60)
        .await
        .unwrap();
    assert_eq!(
        c.link_avatar("code1", "avatar-a", "Lobby", owner)
            .await
            .unwrap(),
        LinkOutcome::Linked(owner)
    );
    assert_eq!(
        c.link_avatar("code1", "avatar-b", "Lobby", owner)
            .await
            .unwrap(),
        LinkOutcome::CodeInvalid,
        "a code links once"
    );
    assert_eq!(
        c.link_avatar("code2", "avatar-a", "Lobby", owner)
            .await
            .unwrap(),
        LinkOutcome::LinkedElsewhere
    );
    assert_eq!(c.avatar_account("avatar-a").await.unwrap(), Some(owner));
    c.unlink_avatar("avatar-a", other).await.unwrap();
    assert_eq!(
        c.avatar_account("avatar-a").await.unwrap(),
        Some(owner),
        "only the holder unlinks"
    );
    assert_eq!(
        c.avatar_links(owner).await.unwrap()[0].via_terminal,
        "Lobby"
    );
    c.unlink_avatar("avatar-a", owner).await.unwrap();
    assert_eq!(c.avatar_account("avatar-a").await.unwrap(), None);
    assert!(c.delete_terminal("t1", owner).await.unwrap());
}

pub async fn a_snapshot_holds_what_the_catalog_held(c: &SharedCatalog) {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        account(c, &format!("u{i}@example.com"), 5).await;
    }
    // Writers go on while snapshots are taken; each copy is consistent.
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 3..100_000 {
                account(&c, &format!("u{i}@example.com"), 5).await;
                tokio::task::yield_now().await;
            }
        })
    };
    for n in 0..3 {
        let dest = dir.path().join(format!("s{n}"));
        let counts = c.snapshot(&dest).await.unwrap();
        let users = counts.tables["users"];
        assert!(users >= 3);
        assert_eq!(counts.tables["ledger"], users, "one bonus per account");
        assert!(counts.schema > 0);
        assert_eq!(inspect_snapshot(&dest).await.unwrap(), counts);
    }
    writer.abort();
}

pub async fn the_console_reads_accounts_counts_and_an_append_only_audit_log(c: &SharedCatalog) {
    let op = c
        .create_account("op@example.com", "h", Role::Operator, 0)
        .await
        .unwrap();
    let a = account(c, "alice@example.com", 30).await;
    account(c, "bob@example.com", 0).await;
    let found = c.accounts("ALICE", 10).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].id, found[0].balance, found[0].role),
        (a, 30, Role::Uploader)
    );
    assert_eq!(c.accounts("", 10).await.unwrap().len(), 3);
    assert!(
        c.accounts("%", 10).await.unwrap().is_empty(),
        "literal, not a pattern"
    );

    for (action, target) in [("grant_credits", "account:2"), ("node_drain", "node:utah")] {
        c.record_audit(&AuditEntry {
            actor_id: op,
            actor: "op@example.com",
            action,
            target,
            detail: "amount=5",
        })
        .await
        .unwrap();
    }
    let log = c.audit_entries(10).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        vec!["node_drain", "grant_credits"],
        "newest first"
    );
    assert_eq!(
        (log[1].actor.as_str(), log[1].target.as_str()),
        ("op@example.com", "account:2")
    );
    assert!(log[0].at >= now() - 5);

    // One published movie short of copies, one damaged, one job waiting.
    published(c, "m", a, 0).await;
    c.insert_asset("d", a, "D", "d.mp4", 1).await.unwrap();
    c.record_sealed("d", "test", "bd", 10, 9, b"k", &["utah".into()])
        .await
        .unwrap();
    assert!(c.mark_damaged("d").await.unwrap());
    c.insert_asset("q", a, "Q", "q.mp4", 1).await.unwrap();
    let s = c.replication_summary(2, now() + 30).await.unwrap();
    assert_eq!(
        (s.under_replicated, s.damaged, s.jobs_waiting, s.jobs_failed),
        (1, 1, 1, 0),
        "{s:?}"
    );
    assert!(s.oldest_job_secs >= 30);
    assert_eq!(s.copies_pending, 1, "d's copy on utah");
    c.insert_asset("r", a, "R", "r.mp4", 1).await.unwrap();
    let jobs = c.jobs(10).await.unwrap();
    assert_eq!(
        jobs.iter()
            .map(|j| (j.id.as_str(), j.state))
            .collect::<Vec<_>>(),
        vec![("q", AssetState::Queued), ("r", AssetState::Queued)],
        "oldest first; published and damaged movies are not jobs"
    );
    assert_eq!(jobs[0].owner_email, "alice@example.com");
    c.reject("q", "test", "processing_failed", "x")
        .await
        .unwrap();
    assert_eq!(
        c.request_cancel("r").await.unwrap(),
        CancelOutcome::Cancelled
    );
    let jobs = c.jobs(10).await.unwrap();
    assert_eq!(
        jobs.len(),
        1,
        "a cancelled upload is no job; a failed one is: {jobs:?}"
    );
    assert_eq!(
        (jobs[0].state, jobs[0].error_code.as_deref()),
        (AssetState::Rejected, Some("processing_failed"))
    );
    let s = c.replication_summary(1, now()).await.unwrap();
    assert_eq!(
        (s.under_replicated, s.jobs_waiting, s.jobs_failed),
        (0, 0, 1)
    );
}

mod sqlite_backend {
    async fn fresh() -> (tempfile::TempDir, super::SharedCatalog) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        (
            dir,
            std::sync::Arc::new(super::sqlite::SqliteCatalog::open(&url).await.unwrap()),
        )
    }
    crate::catalog::conformance::suite!(fresh());
}

pub async fn the_monitor_keeps_states_days_and_changes(c: &SharedCatalog) {
    use crate::domain::Health;
    let r = |state: Health| CheckResult {
        check_id: "node.utah".into(),
        component: "playback:utah".into(),
        state,
        detail: format!("{state}"),
    };
    let day = 20_000 * 86_400;
    // First sight: no time counted yet, one change recorded.
    assert!(c
        .record_check(&r(Health::Ok), day + 100, 60)
        .await
        .unwrap()
        .is_none());
    // 30 s later, still ok: 30 s of ok.
    let before = c
        .record_check(&r(Health::Ok), day + 130, 60)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((before.state, before.since), (Health::Ok, day + 100));
    // Down: the 30 s before it still count as ok (the state it was in).
    c.record_check(&r(Health::Down), day + 160, 60)
        .await
        .unwrap();
    // After a gap of 1000 s (the manager was down), only `max_gap` counts.
    c.record_check(&r(Health::Down), day + 1160, 60)
        .await
        .unwrap();
    let days = c.check_days(20_000).await.unwrap();
    assert_eq!(days.len(), 1);
    let d = &days[0];
    assert_eq!(
        (d.day, d.ok_secs, d.degraded_secs, d.down_secs),
        (20_000, 60, 0, 60)
    );
    let s = c.check_states().await.unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].state, s[0].since, s[0].checked_at),
        (Health::Down, day + 160, day + 1160)
    );
    assert_eq!(s[0].notified_state, None);
    c.mark_notified("node.utah", Health::Down, day + 161)
        .await
        .unwrap();
    let s = &c.check_states().await.unwrap()[0];
    assert_eq!(
        (s.notified_state, s.notified_at),
        (Some(Health::Down), Some(day + 161))
    );
    // Two changes (ok, down), newest first; a repeat is not a change.
    let h = c.check_history(10).await.unwrap();
    assert_eq!(
        h.iter().map(|e| e.state).collect::<Vec<_>>(),
        vec![Health::Down, Health::Ok]
    );
    // The next day's seconds are that day's; pruning keeps only recent days.
    c.record_check(&r(Health::Ok), day + 86_400 + 10, 60)
        .await
        .unwrap();
    assert_eq!(c.check_days(20_001).await.unwrap()[0].down_secs, 60);
    c.prune_monitor(day + 86_400).await.unwrap();
    assert_eq!(c.check_days(0).await.unwrap().len(), 1);
    assert_eq!(
        c.check_history(10).await.unwrap().len(),
        1,
        "changes before the cut are gone"
    );
}

pub async fn incidents_deliveries_and_drains(c: &SharedCatalog) {
    let id = c
        .create_incident(&NewIncident {
            title: "Slow",
            impact: "minor",
            components: "web",
            starts_at: None,
            ends_at: None,
            status: "investigating",
            body: "looking",
            author: "op@x",
            at: 1000,
        })
        .await
        .unwrap();
    let u = |status: &str, at: i64| IncidentUpdate {
        incident_id: id,
        at,
        status: status.into(),
        body: status.into(),
        author: "op@x".into(),
    };
    assert!(c
        .add_incident_update(&u("identified", 1100), false)
        .await
        .unwrap());
    assert!(c
        .add_incident_update(&u("resolved", 1200), true)
        .await
        .unwrap());
    assert!(
        !c.add_incident_update(&u("monitoring", 1300), false)
            .await
            .unwrap(),
        "closed"
    );
    let all = c.incidents(0).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].resolved_at, Some(1200));
    assert_eq!(
        all[0]
            .updates
            .iter()
            .map(|u| u.status.as_str())
            .collect::<Vec<_>>(),
        vec!["investigating", "identified", "resolved"]
    );
    assert!(
        c.incidents(5000).await.unwrap().is_empty(),
        "closed before the window"
    );
    c.record_delivery(&Delivery {
        at: 10,
        channel: "email".into(),
        subject: "node.utah".into(),
        kind: "firing".into(),
        attempt: 1,
        ok: false,
        answer: "refused".into(),
    })
    .await
    .unwrap();
    let d = c.deliveries(10).await.unwrap();
    assert_eq!(
        (d.len(), d[0].ok, d[0].answer.as_str()),
        (1, false, "refused")
    );
    assert!(c.set_drained("utah", true, "op@x", 1).await.unwrap());
    assert!(
        !c.set_drained("utah", true, "op@x", 2).await.unwrap(),
        "already"
    );
    assert_eq!(c.drained_nodes().await.unwrap(), vec!["utah".to_string()]);
    assert!(c.set_drained("utah", false, "op@x", 3).await.unwrap());
    assert!(c.drained_nodes().await.unwrap().is_empty());
}

pub async fn withdrawals_priorities_and_disabled_accounts(c: &SharedCatalog) {
    let owner = c
        .create_account("owner@example.com", "hash", Role::Uploader, 0)
        .await
        .unwrap();
    let buyer = account(c, "buyer@example.com", 50).await;
    published(c, "m", owner, 5).await;
    c.insert_asset("q1", owner, "Queued One", "a.mp4", 1)
        .await
        .unwrap();
    c.insert_asset("q2", owner, "Queued Two", "b.mp4", 1)
        .await
        .unwrap();
    let ids = |v: Vec<AssetLine>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
    let find = |search: &'static str, state: Option<AssetState>, under: Option<i64>| {
        let c = c.clone();
        async move {
            ids(c
                .search_assets(
                    &AssetFilter {
                        search,
                        state,
                        under_replicated_below: under,
                    },
                    10,
                )
                .await
                .unwrap())
        }
    };
    // Title (any case), owner's email, whole id; "%" means itself.
    let mut queued = find("queued", None, None).await;
    queued.sort();
    assert_eq!(queued, ["q1", "q2"]);
    assert_eq!(find("owner@", None, None).await.len(), 3);
    assert_eq!(find("m", Some(AssetState::Published), None).await, ["m"]);
    assert!(find("%", None, None).await.is_empty());
    assert_eq!(find("", None, Some(2)).await, ["m"], "one copy of two");
    assert!(find("", None, Some(1)).await.is_empty());
    let line = c.asset_line("m").await.unwrap().unwrap();
    assert_eq!((line.verified_copies, line.copies), (1, 1));
    assert_eq!(line.owner_email, "owner@example.com");

    // Withdrawn: every reader sees it so, purchases refuse it, the
    // pipeline's own moves do not bring it back; only a finished movie.
    assert!(!c.set_withdrawn("q1", Some("x"), 10).await.unwrap());
    assert!(c.set_withdrawn("m", Some("complaint"), 10).await.unwrap());
    assert!(!c.set_withdrawn("m", Some("again"), 11).await.unwrap());
    assert_eq!(
        c.asset("m").await.unwrap().unwrap().state,
        AssetState::Withdrawn
    );
    assert_eq!(find("", Some(AssetState::Withdrawn), None).await, ["m"]);
    assert!(
        find("", None, Some(2)).await.is_empty(),
        "not counted short"
    );
    assert!(c.published_assets(10).await.unwrap().is_empty());
    assert!(c.canary_asset().await.unwrap().is_none());
    assert_eq!(
        refused(c.purchase(&order(buyer, "m", "r1", "g1", None)).await),
        Refused::NotPublished
    );
    assert_eq!(c.balance(buyer).await.unwrap(), 50);
    c.replica_lost("m", "utah", "gone", i64::MAX).await.unwrap();
    c.mark_damaged("m").await.unwrap();
    c.replica_seen_good("m", "utah", Some(now())).await.unwrap();
    // An inventory's proof times only ever raise a verified copy's.
    let utah = |rs: Vec<Replica>| rs.into_iter().find(|r| r.node == "utah").unwrap();
    let proved = utah(c.replicas("m").await.unwrap()).verified_at.unwrap();
    let seen = [
        ("m".to_string(), proved - 10),
        ("nope".to_string(), proved + 9),
    ];
    assert_eq!(c.refresh_verified_at("utah", &seen).await.unwrap(), 0);
    let seen = [("m".to_string(), proved + 100)];
    assert_eq!(c.refresh_verified_at("toronto", &seen).await.unwrap(), 0);
    assert_eq!(c.refresh_verified_at("utah", &seen).await.unwrap(), 1);
    let r = utah(c.replicas("m").await.unwrap());
    assert_eq!(
        (r.state, r.verified_at),
        (ReplicaState::Verified, Some(proved + 100))
    );
    assert!(c.undamage("m").await.unwrap());
    assert_eq!(
        c.asset("m").await.unwrap().unwrap().state,
        AssetState::Withdrawn
    );
    let line = c.asset_line("m").await.unwrap().unwrap();
    assert_eq!(line.withdrawn_reason.as_deref(), Some("complaint"));
    assert!(c.set_withdrawn("m", None, 12).await.unwrap());
    assert!(!c.set_withdrawn("m", None, 13).await.unwrap());
    assert!(c.publish_if_replicated("m", 1).await.unwrap());
    assert_eq!(
        c.asset("m").await.unwrap().unwrap().state,
        AssetState::Published
    );
    assert_eq!(c.published_assets(10).await.unwrap().len(), 1);

    // Repair now: only copies still waiting, once.
    c.replica_failed("m", "utah", "boom", now() + 3600)
        .await
        .unwrap();
    assert_eq!(c.asset_replicas_due_now("m").await.unwrap(), 1);
    assert_eq!(c.asset_replicas_due_now("m").await.unwrap(), 0);

    // Priorities: a raised job is claimed first and names its worker.
    assert_eq!(c.raise_priority("q2").await.unwrap(), Some(1));
    assert_eq!(c.raise_priority("m").await.unwrap(), None, "not queued");
    assert_eq!(c.raise_priority("nope").await.unwrap(), None);
    let first = c.claim_next(30, "host/transcode-1").await.unwrap().unwrap();
    assert_eq!(first.id, "q2");
    assert_eq!(c.raise_priority("q2").await.unwrap(), None, "in a step");
    assert_eq!(c.raise_priority("q1").await.unwrap(), Some(2));
    let jobs = c.jobs(10).await.unwrap();
    assert_eq!(
        jobs.iter()
            .map(|j| (j.id.as_str(), j.priority, j.worker.as_deref()))
            .collect::<Vec<_>>(),
        [("q1", 2, None), ("q2", 1, Some("host/transcode-1"))]
    );

    // Disabled: sessions end, tokens and sessions no longer resolve, the
    // log-in lookup says so; enabled again, tokens work again.
    c.insert_session("s", buyer, "csrf", now() + 3600)
        .await
        .unwrap();
    c.insert_api_token("t", buyer, "script").await.unwrap();
    assert!(c.set_disabled(buyer, true, 20).await.unwrap());
    assert!(!c.set_disabled(buyer, true, 21).await.unwrap());
    assert!(c.session_user("s").await.unwrap().is_none());
    assert!(c.api_token_user("t").await.unwrap().is_none());
    assert!(
        c.user_by_email("buyer@example.com")
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
    assert_eq!(
        c.account(buyer).await.unwrap().unwrap().disabled_at,
        Some(20)
    );
    assert!(c.set_disabled(buyer, false, 22).await.unwrap());
    assert!(c.api_token_user("t").await.unwrap().is_some());
    assert!(
        c.session_user("s").await.unwrap().is_none(),
        "ended for good"
    );
    assert!(
        !c.user_by_email("buyer@example.com")
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
    assert_eq!(c.balance(buyer).await.unwrap(), 50, "the books untouched");

    // In-world: a disabled account's avatar buys nothing and a disabled
    // owner's terminal is unknown; both come back when it is enabled.
    c.insert_terminal("t1", owner, "Lobby", b"wrapped")
        .await
        .unwrap();
    c.replace_link_code(buyer, "code1", now() + 60)
        .await
        .unwrap();
    c.link_avatar("code1", "avatar-b", "Lobby", owner)
        .await
        .unwrap();
    assert_eq!(c.avatar_account("avatar-b").await.unwrap(), Some(buyer));
    c.set_disabled(buyer, true, 30).await.unwrap();
    c.set_disabled(owner, true, 30).await.unwrap();
    assert_eq!(c.avatar_account("avatar-b").await.unwrap(), None);
    assert!(c.terminal("t1").await.unwrap().is_none());
    c.set_disabled(buyer, false, 31).await.unwrap();
    c.set_disabled(owner, false, 31).await.unwrap();
    assert_eq!(c.avatar_account("avatar-b").await.unwrap(), Some(buyer));
    assert!(c.terminal("t1").await.unwrap().is_some());

    // Moving a job ahead also ends its back-off.
    assert_eq!(c.claim_next(30, "w").await.unwrap().unwrap().id, "q1");
    c.insert_asset("q3", owner, "Q3", "c.mp4", 1).await.unwrap();
    assert_eq!(c.claim_next(30, "w").await.unwrap().unwrap().id, "q3");
    c.retry_later("q3", "w", 3600).await.unwrap();
    assert!(c.claim_next(30, "w").await.unwrap().is_none(), "waiting");
    assert!(c.raise_priority("q3").await.unwrap().is_some());
    assert_eq!(c.claim_next(30, "w").await.unwrap().unwrap().id, "q3");
}

pub async fn owners_take_turns_in_the_queue_and_usage_is_counted(c: &SharedCatalog) {
    let busy = account(c, "busy@example.com", 0).await;
    let other = account(c, "other@example.com", 0).await;
    // Fifty from one account, then one from another: the other's is second.
    for i in 0..50 {
        c.insert_asset(&format!("a{i:02}"), busy, "A", "a.mp4", 100)
            .await
            .unwrap();
    }
    c.insert_asset("b00", other, "B", "b.mp4", 7).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(c.claim_next(30, "w").await.unwrap().unwrap().id);
    }
    assert_eq!(order, ["a00", "b00", "a01", "a02"]);
    // What an account keeps and made: rejected movies keep nothing.
    assert_eq!(c.upload_usage(busy, 0).await.unwrap(), (5000, 50));
    assert_eq!(c.upload_usage(other, 0).await.unwrap(), (7, 1));
    c.reject("a49", "test", "unsupported_codec", "x")
        .await
        .unwrap();
    assert_eq!(c.upload_usage(busy, 0).await.unwrap(), (4900, 50));
    assert_eq!(c.upload_usage(busy, now() + 10).await.unwrap().1, 0);
}

mod postgres_backend {
    crate::catalog::conformance::suite!(super::postgres::fresh());
}
