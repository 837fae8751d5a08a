//! Serving HTTP/1.1 to the public with the limits such a server needs
//! (docs/operations.md, "Connections and timeouts"). `axum::serve` gives
//! hyper no timer, so no header timeout applies, and it has no idle,
//! transfer or connection limit: a few thousand sockets that send half a
//! request, or players that pause and never read again, would hold every
//! file descriptor. Both binaries serve through [`serve`] instead:
//!
//! - **Headers and idle**: a client has `header_timeout_secs` to send a
//!   request's headers; the same bound closes a kept-alive connection that
//!   sends no next request (hyper starts the timer whenever it waits for a
//!   request head).
//! - **Transfers**: while a response waits for the client to take it (a
//!   write blocks), at least `transfer_min_bytes` must go out in every
//!   `transfer_window_secs`, or the connection is closed; the same holds for
//!   a request body the handler waits for. A paused player is cut after one
//!   window and simply asks again (with a `Range`) when it resumes, as it
//!   does after any dropped connection. Only waiting counts: a handler that
//!   works a long time before answering is not cut.
//! - **Connections**: at most `max_connections` at once; at the cap the
//!   listener stops accepting (the kernel's backlog holds newcomers) and
//!   says so in the log, at most once a minute.
//! - **File descriptors**: [`raise_nofile`] lifts the soft limit to the
//!   hard one at start, so the cap, not the limit, is what binds.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{extract::ConnectInfo, Router};
use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    time::{Instant, Sleep},
};

/// The `[server]` section of both binaries' configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Seconds a client has to send a request's headers; also the longest
    /// a kept-alive connection may sit idle (1 to 300).
    pub header_timeout_secs: u64,
    /// While a transfer waits on the client, at least `transfer_min_bytes`
    /// must move in every window of this many seconds (5 to 3600).
    pub transfer_window_secs: u64,
    /// See `transfer_window_secs`; 0 turns the transfer limit off.
    pub transfer_min_bytes: u64,
    /// Connections at once; 0: derived from the file-descriptor limit
    /// (half of it, less 256 for files and the database, at most 50,000).
    pub max_connections: usize,
    /// Connections at once from one client address (0: no limit), so one
    /// address cannot take every slot. Addresses in the binary's
    /// `trusted_proxies` (a reverse proxy speaks for many) are not limited.
    pub max_connections_per_address: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_timeout_secs: 20,
            transfer_window_secs: 60,
            // About 1 KB/s: far below any connection that can play a movie.
            transfer_min_bytes: 64 * 1024,
            max_connections: 0,
            max_connections_per_address: 256,
        }
    }
}

impl ServerConfig {
    /// `Err((field, why))` for a value out of range.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !(1..=300).contains(&self.header_timeout_secs) {
            return Err(("header_timeout_secs", "must be between 1 and 300"));
        }
        if !(5..=3600).contains(&self.transfer_window_secs) {
            return Err(("transfer_window_secs", "must be between 5 and 3600"));
        }
        if self.max_connections != 0 && self.max_connections < 16 {
            return Err(("max_connections", "must be 0 (derived) or at least 16"));
        }
        Ok(())
    }

    /// The connection cap: configured, or derived from `nofile`.
    pub fn connection_cap(&self, nofile: u64) -> usize {
        if self.max_connections != 0 {
            return self.max_connections;
        }
        (nofile.saturating_sub(256) / 2).clamp(64, 50_000) as usize
    }
}

/// Raises the soft file-descriptor limit to the hard one (at most 2^20);
/// returns the soft limit in force afterwards.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        let want = r.rlim_max.min(1 << 20);
        if r.rlim_cur < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = want;
            }
        }
        r.rlim_cur
    }
}

/// Whether `ip` may read an endpoint restricted to `allow` (empty: all).
pub fn allowed(allow: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    allow.is_empty() || allow.iter().any(|n| n.contains(&ip))
}

/// A check's result reused for `ttl`: callers within that time, and those
/// arriving while it runs, share one run (health checks that write to disk
/// must not be a free amplifier). The check runs in a task of its own, so
/// a caller that hangs up does not cut it short (leaving its probe file
/// behind), and is given `limit`: a hung disk or database answers
/// "unhealthy" within it instead of holding every caller.
pub struct Recent<T> {
    slot: tokio::sync::Mutex<Option<(Instant, T)>>,
    ttl: Duration,
    limit: Duration,
}

impl<T: Clone + Send + 'static> Recent<T> {
    pub fn new(ttl: Duration, limit: Duration) -> Self {
        Self {
            slot: tokio::sync::Mutex::new(None),
            ttl,
            limit,
        }
    }

    /// The last result if fresh, else `run`'s (or `timed_out()` past the limit).
    pub async fn get_or(
        &self,
        run: impl std::future::Future<Output = T> + Send + 'static,
        timed_out: impl FnOnce() -> T,
    ) -> T {
        let mut slot = self.slot.lock().await;
        if let Some((at, v)) = slot.as_ref() {
            if at.elapsed() < self.ttl {
                return v.clone();
            }
        }
        let v = match tokio::time::timeout(self.limit, tokio::spawn(run)).await {
            Ok(Ok(v)) => v,
            Ok(Err(_)) | Err(_) => timed_out(),
        };
        *slot = Some((Instant::now(), v.clone()));
        v
    }
}

/// True at most once a minute per `last`: log lines a client can provoke
/// at will must not fill the disk.
fn once_a_minute(last: &AtomicI64) -> bool {
    let now = crate::runtime::unix_now();
    let before = last.load(Ordering::Relaxed);
    now - before >= 60
        && last
            .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Everything [`serve`] needs besides the listener and the app.
#[derive(Clone)]
pub struct Serving {
    pub cfg: ServerConfig,
    /// Prefix of this server's metric names (`manager`, `viewnode`).
    pub metrics: &'static str,
    /// Set: the listener speaks TLS (handshake within 10 s).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Seconds requests in flight get to finish once `shutdown` fires.
    pub grace: Duration,
    /// The connection cap (see [`ServerConfig::connection_cap`]), shared by
    /// every listener of the process (see [`Serving::new`]).
    pub max_connections: usize,
    slots: Arc<tokio::sync::Semaphore>,
    per_address: Arc<PerAddress>,
    /// Not limited per address (reverse proxies, see [`Serving::exempt`]).
    exempt: Arc<Vec<ipnet::IpNet>>,
}

/// Connections open per client address.
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection counted against its address; uncounted on drop.
struct AddressSlot(Arc<PerAddress>, std::net::IpAddr);

impl PerAddress {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<AddressSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), ip))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl Serving {
    /// One cap for all of a process's listeners: clones share it.
    pub fn new(cfg: ServerConfig, metrics: &'static str, grace: Duration, nofile: u64) -> Self {
        let max_connections = cfg.connection_cap(nofile);
        Self {
            cfg,
            metrics,
            tls: None,
            grace,
            max_connections,
            slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            per_address: Default::default(),
            exempt: Default::default(),
        }
    }

    /// Addresses not limited per address (the binary's `trusted_proxies`).
    pub fn exempt(mut self, proxies: &[ipnet::IpNet]) -> Self {
        self.exempt = Arc::new(proxies.to_vec());
        self
    }

    /// The same limits (and the same cap) for a TLS listener.
    pub fn with_tls(&self, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        Self {
            tls: Some(acceptor),
            ..self.clone()
        }
    }
}

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests
/// in flight finish for up to `grace`. Handlers see the peer's address as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    s: Serving,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    // The accept loop runs as a task on a runtime worker, not wherever
    // `serve` is awaited (the binaries await it in `block_on`, on the main
    // thread). A connection spawned from a worker runs next on that same
    // worker; spawned from the main thread it had to wake a worker first,
    // and that hop was most of a request's time to first byte beyond
    // nginx's (docs/operations.md, "Playback performance").
    // Dropping `serve` (an aborted task) stops accepting, as before.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut accepting = AbortOnDrop(tokio::spawn(accept_loop(listener, app, s, shutdown)));
    if let Err(e) = (&mut accepting.0).await {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    s: Serving,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = s.slots.clone();
    let last_cap_log = AtomicI64::new(0);
    let last_accept_log = AtomicI64::new(0);
    let last_per_address_log = AtomicI64::new(0);
    let per_address_counter = format!("{}_http_connection_cap_per_address_total", s.metrics);
    let open_gauge = format!("{}_http_connections_open", s.metrics);
    let refused_counter = format!("{}_http_connection_cap_reached_total", s.metrics);
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the cap nothing more is accepted.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics::counter!(refused_counter.clone()).increment(1);
                if once_a_minute(&last_cap_log) {
                    tracing::warn!(
                        code = "connection_cap_reached",
                        max_connections = s.max_connections,
                        "every connection slot is taken; new clients wait in the listen backlog (server.max_connections)"
                    );
                }
                tokio::select! {
                    p = slots.clone().acquire_owned() => p.expect("never closed"),
                    _ = &mut shutdown => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // A client that gave up before we took it: nothing to do.
                Err(e) if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) => continue,
                Err(e) => {
                    // Out of descriptors, most likely: do not spin.
                    if once_a_minute(&last_accept_log) {
                        tracing::warn!("cannot accept a connection (said once a minute): {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let address_slot = if s.cfg.max_connections_per_address == 0
            || s.exempt.iter().any(|n| n.contains(&peer.ip()))
        {
            None
        } else {
            match s
                .per_address
                .take(peer.ip(), s.cfg.max_connections_per_address)
            {
                Some(a) => Some(a),
                None => {
                    // Closed at once: this address holds its share.
                    metrics::counter!(per_address_counter.clone()).increment(1);
                    if once_a_minute(&last_per_address_log) {
                        tracing::warn!(
                            code = "connection_cap_per_address_reached",
                            peer = %peer.ip(),
                            max = s.cfg.max_connections_per_address,
                            "one address holds its whole share of connections; more from it are closed (server.max_connections_per_address; said once a minute)"
                        );
                    }
                    continue;
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let (app, s2, watcher) = (app.clone(), s.clone(), graceful.watcher());
        let open_gauge = open_gauge.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _address_slot = address_slot;
            let _open = OpenGauge::new(open_gauge);
            let window = Duration::from_secs(s2.cfg.transfer_window_secs);
            let min = s2.cfg.transfer_min_bytes;
            let io = SlowClientGuard::new(tcp, window, min);
            match &s2.tls {
                None => connection(io, peer, app, &s2, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => connection(tls, peer, app, &s2, watcher).await,
                        Ok(Err(e)) => handshake_failed(&s2, peer, &e.to_string()),
                        Err(_) => handshake_failed(&s2, peer, "no handshake within 10 s"),
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(s.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the grace period; stopping anyway");
    }
}

/// Counts an open connection for as long as it lives, also through a panic.
struct OpenGauge(String);

impl OpenGauge {
    fn new(name: String) -> Self {
        metrics::gauge!(name.clone()).increment(1.0);
        Self(name)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!(self.0.clone()).decrement(1.0);
    }
}

fn handshake_failed(s: &Serving, peer: SocketAddr, why: &str) {
    static LAST: AtomicI64 = AtomicI64::new(0);
    metrics::counter!(format!("{}_tls_handshake_failures_total", s.metrics)).increment(1);
    if once_a_minute(&LAST) {
        tracing::warn!(%peer, code = "tls_handshake_failed", "TLS handshake failed (said at most once a minute; see the metric): {why}");
    }
}

async fn connection<I>(
    io: I,
    peer: SocketAddr,
    app: Router,
    s: &Serving,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let window = Duration::from_secs(s.cfg.transfer_window_secs);
    let min = s.cfg.transfer_min_bytes;
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let req = req.map(|b| axum::body::Body::new(SlowBodyGuard::new(b, window, min)));
        tower::ServiceExt::oneshot(app.clone(), req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(s.cfg.header_timeout_secs))
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

/// The transfer rule for one direction: while the peer makes us wait, it
/// must move at least `min` bytes per `window` of waiting. Only time spent
/// waiting on the peer counts (a handler's own work between writes, or
/// between requests on a kept-alive connection, does not).
struct Pace {
    /// Created at the first wait (most request bodies never wait).
    timer: Option<Pin<Box<Sleep>>>,
    /// When the current wait began.
    waiting_since: Option<Instant>,
    /// Waiting time in this window before the current wait.
    waited: Duration,
    moved: u64,
    window: Duration,
    min: u64,
}

impl Pace {
    fn new(window: Duration, min: u64) -> Self {
        Self {
            timer: None,
            waiting_since: None,
            waited: Duration::ZERO,
            moved: 0,
            window,
            min,
        }
    }

    fn progressed(&mut self, n: usize) {
        if let Some(since) = self.waiting_since.take() {
            self.waited += since.elapsed();
        }
        self.moved += n as u64;
        if self.moved >= self.min {
            // This window's due is paid: a fresh one starts.
            self.moved = 0;
            self.waited = Duration::ZERO;
        }
    }

    /// Called when the peer makes us wait: `Err` once a window's worth of
    /// waiting went by with less than `min` moved.
    fn waiting(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.min == 0 {
            return Ok(());
        }
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + self.window.saturating_sub(self.waited);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if std::future::Future::poll(timer.as_mut(), cx).is_pending() {
            return Ok(());
        }
        // A whole window of waiting: `moved` is below `min` here, since a
        // paid window is reset as soon as it is paid (`progressed`).
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client moved too few bytes for too long",
        ))
    }
}

/// The socket with the transfer rule on writes (a client that does not
/// take its response). Reads are left to hyper's header timeout and to
/// [`SlowBodyGuard`]: hyper keeps a read pending while a handler works, and
/// that wait is not the client's.
pub struct SlowClientGuard<T> {
    inner: T,
    pace: Pace,
}

impl<T> SlowClientGuard<T> {
    pub fn new(inner: T, window: Duration, min: u64) -> Self {
        Self {
            inner,
            pace: Pace::new(window, min),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SlowClientGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> SlowClientGuard<T> {
    fn paced(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                self.pace.progressed(n);
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match self.pace.waiting(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SlowClientGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.paced(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.paced(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body with the transfer rule: only while the handler waits
/// for the next bytes does the clock run.
pub struct SlowBodyGuard<B> {
    inner: B,
    pace: Pace,
}

impl<B> SlowBodyGuard<B> {
    pub fn new(inner: B, window: Duration, min: u64) -> Self {
        Self {
            inner,
            pace: Pace::new(window, min),
        }
    }
}

impl<B> hyper::body::Body for SlowBodyGuard<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.pace.progressed(d.len());
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.pace.waiting(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => {
                    tracing::info!("request body too slow; connection closed");
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_follows_the_file_limit_unless_set() {
        let c = ServerConfig::default();
        assert_eq!(c.connection_cap(1024), 384);
        assert_eq!(c.connection_cap(20_000), 9872);
        assert_eq!(c.connection_cap(100), 64);
        assert_eq!(c.connection_cap(1 << 20), 50_000);
        let set = ServerConfig {
            max_connections: 500,
            ..ServerConfig::default()
        };
        assert_eq!(set.connection_cap(1024), 500);
        assert!(ServerConfig {
            max_connections: 3,
            ..ServerConfig::default()
        }
        .validate()
        .is_err());
        assert!(ServerConfig::default().validate().is_ok());
    }

    /// One address gets its share and no more; a slot comes back when its
    /// connection ends; an exempt address (a proxy) is not limited.
    #[tokio::test]
    async fn one_address_cannot_take_every_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn start(exempt: &[ipnet::IpNet]) -> SocketAddr {
            let cfg = ServerConfig {
                max_connections_per_address: 2,
                ..ServerConfig::default()
            };
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let app = Router::new().route("/", axum::routing::get(|| async { "hi" }));
            let s = Serving::new(cfg, "test", Duration::from_secs(1), 4096).exempt(exempt);
            tokio::spawn(serve(l, app, s, std::future::pending()));
            addr
        }
        async fn answers(addr: SocketAddr) -> bool {
            let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else {
                return false;
            };
            if c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .is_err()
            {
                return false;
            }
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).contains("hi")
        }
        let addr = start(&[]).await;
        let a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !answers(addr).await,
            "a third from the same address is closed"
        );
        drop(a);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(answers(addr).await, "a slot came back");
        drop(b);
        let proxy = start(&["127.0.0.0/8".parse().unwrap()]).await;
        let held: Vec<_> =
            futures::future::join_all((0..5).map(|_| tokio::net::TcpStream::connect(proxy))).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(answers(proxy).await, "a proxy is not limited");
        drop(held);
    }

    #[test]
    fn metrics_are_served_to_listed_addresses_only() {
        let allow: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.7/32".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(allowed(&[], ip("203.0.113.1")), "empty: everyone");
        assert!(allowed(&allow, ip("10.1.2.3")));
        assert!(allowed(&allow, ip("192.0.2.7")));
        assert!(allowed(&allow, ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!allowed(&allow, ip("192.0.2.8")));
        assert!(!allowed(&allow, ip("2001:db8::1")));
    }

    /// Callers within the time share one run; a hung check answers its
    /// fallback within the limit, and the next caller runs it again.
    #[tokio::test(start_paused = true)]
    async fn health_checks_are_shared_and_bounded() {
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let r: Arc<Recent<u32>> =
            Arc::new(Recent::new(Duration::from_secs(2), Duration::from_secs(5)));
        let run = |hang: bool| {
            let runs = runs.clone();
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                if hang {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                n
            }
        };
        let many: Vec<_> = (0..50)
            .map(|_| {
                let (r, f) = (r.clone(), run(false));
                tokio::spawn(async move { r.get_or(f, || 0).await })
            })
            .collect();
        for h in many {
            assert_eq!(h.await.unwrap(), 1, "one run for all");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let started = Instant::now();
        assert_eq!(r.get_or(run(true), || 99).await, 99, "hung: the fallback");
        assert!(started.elapsed() <= Duration::from_secs(6));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            r.get_or(run(false), || 0).await,
            3,
            "run again after the time"
        );
    }

    /// Time the server spends not writing (a handler working, a kept-alive
    /// connection between requests) is not charged to the client.
    #[tokio::test(start_paused = true)]
    async fn only_time_spent_waiting_on_the_client_counts() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = SlowClientGuard::new(a, Duration::from_secs(60), 4096);
        // A first response fills the pipe and waits 50 s for the client.
        w.write_all(&[1u8; 1024]).await.unwrap();
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(50)).await;
            let mut buf = vec![0u8; 2048];
            let n = b.read(&mut buf).await.unwrap();
            (b, n)
        });
        w.write_all(&[2u8; 512]).await.unwrap();
        let (mut b, n) = reader.await.unwrap();
        assert!(n > 0);
        // The server thinks for 100 s (no write pending), then writes and
        // waits again: 50 s of waiting is left in this window, not none.
        tokio::time::sleep(Duration::from_secs(100)).await;
        let mut buf = vec![0u8; 4096];
        let _ = b.read(&mut buf).await.unwrap();
        w.write_all(&[3u8; 1024]).await.unwrap();
        let started = Instant::now();
        let r = w.write_all(&[4u8; 1024]).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(9) && waited <= Duration::from_secs(11),
            "cut after the 10 s of waiting left in the window: {waited:?}"
        );
        drop(b);
    }

    /// A writer whose peer never reads is cut after one window; one whose
    /// peer reads enough each window is not.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_after_one_window() {
        use tokio::io::AsyncWriteExt;
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = SlowClientGuard::new(a, Duration::from_secs(60), 4096);
        let chunk = vec![7u8; 1024];
        // The peer takes 8 KiB a minute: enough.
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 8192];
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let mut got = 0;
                while got < 4096 {
                    got += b.read(&mut buf).await.unwrap();
                }
            }
            b
        });
        for _ in 0..20 {
            w.write_all(&chunk).await.unwrap();
        }
        let _b = reader.await.unwrap();
        // Now nobody reads: the writer fails after one window, not before.
        let started = Instant::now();
        let mut err = None;
        for _ in 0..10 {
            if let Err(e) = w.write_all(&chunk).await {
                err = Some(e);
                break;
            }
        }
        let e = err.expect("cut off");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited < Duration::from_secs(61),
            "{waited:?}"
        );
    }
}
