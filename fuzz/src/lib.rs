//! What the fuzz targets share: fixed keys, and a real manager (its router,
//! on SQLite in a temporary folder) that a target sends requests to as a
//! client or a node would. The targets' oracle for the manager is that no
//! input, however malformed, gets a `5xx` or a panic: bad input has a
//! stable `4xx` code (docs/fuzzing.md).

/// The data key and asset id every sealed seed is made with.
pub const ASSET: &str = "fuzzasset";
pub fn data_key() -> shared::DataKey {
    shared::DataKey::from_bytes([7; 32])
}

/// The seed the playback tokens in the corpus are signed with.
pub fn token_signer() -> shared::TokenSigner {
    shared::TokenSigner::from_seed_hex(&"22".repeat(32)).expect("a valid seed")
}

/// The secret the manager shares with its node `utah`.
pub const NODE_SECRET: [u8; 16] = [0x33; 16];

#[cfg(feature = "service")]
pub use service::*;

/// The manager in process, for the targets that need the `service` feature.
#[cfg(feature = "service")]
mod service {
    use super::NODE_SECRET;
    use std::{
        net::SocketAddr,
        sync::{
            atomic::{AtomicU32, Ordering},
            Arc, OnceLock,
        },
    };

    use axum::{
        body::Body,
        extract::ConnectInfo,
        http::{Request, StatusCode},
        Router,
    };
    use tower::ServiceExt;

    /// A manager with nodes `utah` and `toronto`, an operator and an API token.
    pub struct Manager {
        pub rt: tokio::runtime::Runtime,
        pub app: Router,
        pub token: String,
        staging: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    pub fn manager() -> &'static Manager {
        static M: OnceLock<Manager> = OnceLock::new();
        M.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let dir = tempfile::tempdir().expect("a temporary folder");
            let text = format!(
                r#"
                data_dir = "{}"
                master_key = "{}"
                token_signing_key = "{}"
                # The fuzzer's accepted uploads pile up in a temporary folder;
                # a disk-space refusal would read as a server error here.
                disk_reserve_mb = 0
                [quotas]
                uploads_per_day = 1000000
                [[nodes]]
                name = "utah"
                url = "http://127.0.0.1:9"
                lat = 40.76
                lon = -111.89
                secret = "{}"
                [[nodes]]
                name = "toronto"
                url = "http://127.0.0.1:9"
                lat = 43.65
                lon = -79.38
                secret = "{}"
                "#,
                dir.path().join("data").display(),
                "11".repeat(32),
                "22".repeat(32),
                hex::encode(NODE_SECRET),
                "44".repeat(16),
            );
            let cfg = manager::Config::from_toml(&text).expect("the fuzz configuration loads");
            let (app, token) = rt.block_on(async {
                let state = manager::AppState::new(cfg, "http://manager.test".into())
                    .await
                    .expect("the manager's state");
                // An operator: no per-account upload limits stand between the
                // fuzzer's bytes and the parsers.
                let owner = state
                    .db
                    .create_account(
                        "fuzz@example.com",
                        "not a hash",
                        "operator".parse().expect("a role"),
                        1_000_000,
                    )
                    .await
                    .expect("an account");
                let token = manager::auth::random_token();
                state
                    .db
                    .insert_api_token(&manager::auth::token_hash(&token), owner, "fuzz")
                    .await
                    .expect("an API token");
                (manager::build_router(Arc::new(state)), token)
            });
            Manager {
                rt,
                app,
                token,
                staging: dir.path().join("data").join("staging"),
                _dir: dir,
            }
        })
    }

    impl Manager {
        /// An upload that ended, however it ended, left no partial file.
        pub fn no_partial_uploads(&self) {
            let partial: Vec<_> = std::fs::read_dir(&self.staging)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.ends_with(".upload"))
                        .collect()
                })
                .unwrap_or_default();
            assert!(partial.is_empty(), "left behind: {partial:?}");
        }

        /// Sends `r` as a client at a different address each time (so the
        /// per-address limits never turn every answer into `429`), and checks
        /// the oracle: never a server error.
        pub fn send(&self, mut r: Request<Body>) -> (StatusCode, Vec<u8>) {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff));
            r.extensions_mut()
                .insert(ConnectInfo(SocketAddr::from((ip, 40000))));
            let (status, body) = self.rt.block_on(async {
                let resp = self.app.clone().oneshot(r).await.expect("infallible");
                let (parts, body) = resp.into_parts();
                let body = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .unwrap_or_default();
                (parts.status, body)
            });
            // `SLMEDIA_FUZZ_SHOW=1` prints each answer: how a corpus author sees
            // that a seed reaches past the first check.
            if std::env::var_os("SLMEDIA_FUZZ_SHOW").is_some() {
                eprintln!("{status} {}", String::from_utf8_lossy(&body));
            }
            assert!(
                !status.is_server_error(),
                "bad input answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
            (status, body)
        }
    }
}
