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

/// Milliseconds since the Unix epoch (clock skew between machines).
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The client's address: `peer`, unless `peer` is one of the `trusted`
/// proxies, in which case the right-most address in `X-Forwarded-For` (its
/// `values`) that is not itself a trusted proxy. Everyone else's header is
/// ignored: it is trivially forged.
pub fn client_ip<'a>(
    peer: std::net::IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[ipnet::IpNet],
) -> std::net::IpAddr {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<std::net::IpAddr> = forwarded_for
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    hops.into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file
/// beside it, fsynced, renamed over it, and the folder fsynced, so a crash
/// leaves either the old content or the new, never a mix.
pub fn write_file_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
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
    // A paid view's short URL carries its grant id, a bearer credential.
    if let Some(rest) = path.strip_prefix("/media/g/") {
        return match rest.split_once('/') {
            Some((_, name)) => format!("/media/g/[grant]/{name}"),
            None => "/media/g/[grant]".to_string(),
        };
    }
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
            loggable_path("/media/g/0123456789abcdef/abc.mp4"),
            "/media/g/[grant]/abc.mp4"
        );
        assert_eq!(
            loggable_path("/media/g/0123456789abcdef"),
            "/media/g/[grant]"
        );
        assert_eq!(
            loggable_path("/media/eyJhbGciOi.sig/abc.mp4"),
            "/media/[token]/abc.mp4"
        );
        assert_eq!(loggable_path("/media/abc.mp4"), "/media/abc.mp4");
        assert_eq!(loggable_path("/healthz"), "/healthz");
    }
}

/// Instruction sets this build was compiled to use that the CPU it runs on
/// lacks. Builds target the CPU of the machine that builds them
/// (`.cargo/config.toml`: AES-GCM is a third faster with VAES and AVX2);
/// a binary copied to an older machine would otherwise die of SIGILL at
/// some random point, so both binaries check this first and refuse to
/// start with a message that says what to do.
pub fn missing_cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut missing = Vec::new();
        macro_rules! check {
            ($($f:tt),* $(,)?) => {$(
                if cfg!(target_feature = $f) && !std::arch::is_x86_feature_detected!($f) {
                    missing.push($f);
                }
            )*};
        }
        check!(
            "aes",
            "pclmulqdq",
            "sse3",
            "ssse3",
            "sse4.1",
            "sse4.2",
            "popcnt",
            "avx",
            "avx2",
            "fma",
            "bmi1",
            "bmi2",
            "lzcnt",
            "f16c",
            "movbe",
            "adx",
            "sha",
            "vaes",
            "vpclmulqdq",
            "gfni",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512dq",
            "avx512cd",
        );
        missing
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// `Err` with the message to print when [`missing_cpu_features`] finds any.
pub fn check_build_cpu(binary: &str) -> Result<(), String> {
    cpu_verdict(binary, &missing_cpu_features())
}

fn cpu_verdict(binary: &str, missing: &[&str]) -> Result<(), String> {
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{binary}: cpu_unsupported: this build uses CPU instructions this machine lacks ({}). \
         It was built for another machine's CPU (target-cpu=native in .cargo/config.toml). \
         Build it on this machine, or for a mix of machines build with \
         RUSTFLAGS='-C target-cpu=x86-64-v2' (slower playback).",
        missing.join(", ")
    ))
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    #[test]
    fn this_build_runs_here_and_a_missing_feature_is_named() {
        // Tests run on the machine that built them: nothing may be missing.
        assert_eq!(missing_cpu_features(), Vec::<&str>::new());
        assert!(check_build_cpu("viewnode").is_ok());
        let err = cpu_verdict("viewnode", &["vaes", "avx2"]).unwrap_err();
        assert!(err.starts_with("viewnode: cpu_unsupported:"), "{err}");
        assert!(err.contains("(vaes, avx2)"), "{err}");
    }
}

/// Space on the file system holding a path, as an unprivileged writer
/// sees it (`f_bavail`: the root reserve does not count as free).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpace {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

impl DiskSpace {
    /// Free space as a share of the whole, 0–100.
    pub fn free_percent(&self) -> u64 {
        (self.free_bytes as u128 * 100)
            .checked_div(self.total_bytes as u128)
            .unwrap_or(0) as u64
    }
}

/// `statvfs(2)` of `path`. Blocking but cheap (no disk I/O beyond the
/// superblock the kernel keeps in memory).
pub fn disk_space(path: &std::path::Path) -> std::io::Result<DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` is a valid out pointer;
    // the struct is read only after the call reports success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let st = unsafe { st.assume_init() };
    // The fields' widths differ between platforms (32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    let (frsize, bavail, blocks) = (st.f_frsize as u64, st.f_bavail as u64, st.f_blocks as u64);
    Ok(DiskSpace {
        free_bytes: bavail.saturating_mul(frsize),
        total_bytes: blocks.saturating_mul(frsize),
    })
}

#[cfg(test)]
mod disk_tests {
    use super::*;

    #[test]
    fn disk_space_of_a_real_folder_and_a_missing_one() {
        let d = tempfile::tempdir().unwrap();
        let s = disk_space(d.path()).unwrap();
        assert!(s.total_bytes > 0 && s.free_bytes <= s.total_bytes, "{s:?}");
        assert!(s.free_percent() <= 100);
        let e = disk_space(&d.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(
            DiskSpace {
                free_bytes: 1,
                total_bytes: 0
            }
            .free_percent(),
            0
        );
    }
}
