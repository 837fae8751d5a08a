//! Process plumbing both binaries share: logging set-up, the Prometheus
//! recorder, and the shutdown signal.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Colour only on
/// a terminal: log files must stay greppable.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The process-wide Prometheus recorder. Installed once: handler tests build
/// several routers in one process.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Seconds since the Unix epoch: the time base of tokens, request
/// signatures, leases and every timestamp in the catalog.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown requested; finishing requests in flight");
}

/// A request path fit for a log: media and playback paths carry a bearer
/// token (`/media/{token}/…` on the manager, `/play/{token}/…` on a node),
/// which must never reach a log file.
pub fn loggable_path(path: &str) -> String {
    for prefix in ["/play/", "/media/"] {
        if let Some(rest) = path.strip_prefix(prefix) {
            return match rest.split_once('/') {
                Some((_, name)) => format!("{prefix}[token]/{name}"),
                // `/media/{id}.mp4` (no token) is safe; `/play/x` may be one.
                None if prefix == "/media/" => path.to_string(),
                None => format!("{prefix}[token]"),
            };
        }
    }
    path.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_redacted_from_logged_paths() {
        use super::loggable_path;
        assert_eq!(
            loggable_path("/play/eyJhbGciOi.sig/abc.mp4"),
            "/play/[token]/abc.mp4"
        );
        assert_eq!(loggable_path("/play/eyJhbGciOi.sig"), "/play/[token]");
        assert_eq!(
            loggable_path("/media/eyJhbGciOi.sig/abc.mp4"),
            "/media/[token]/abc.mp4"
        );
        assert_eq!(loggable_path("/media/abc.mp4"), "/media/abc.mp4");
        assert_eq!(loggable_path("/healthz"), "/healthz");
    }
}
