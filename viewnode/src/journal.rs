//! The view journal: what this node served under each paid grant, kept
//! durably here and delivered to the manager, which applies each event
//! exactly once (docs/credits.md).
//!
//! - A paid response (its token carries a grant) counts the bytes it hands
//!   to the client; when it ends, or every `journal_flush_secs` while it
//!   streams, a delta event `{id, grant, asset, bytes, first_at, last_at}`
//!   goes to the writer thread. Event ids are random UUIDs, so they stay
//!   unique per node across restarts.
//! - The writer appends every pending event to `<storage_dir>/journal/views.jsonl`
//!   in one write and `fsync`s, and only then publishes the new durable
//!   length. Nothing past that length is ever forwarded, so the manager
//!   never hears of an event this node could lose.
//! - The forwarder posts the durable events past `forwarded` (a byte offset,
//!   replaced atomically) to `{manager_url}/internal/v1/nodes/{name}/journal`,
//!   signed like every node call, every `journal_forward_secs` (an empty
//!   batch is a heartbeat). While the manager is down it keeps trying;
//!   playback does not depend on it. A batch delivered but not recorded as
//!   forwarded (a crash in between) is sent again and ignored as duplicate.
//!
//! - A view is journalled from its first byte: the first bytes a paid
//!   response hands out are an event at once, so a client that reads a
//!   little and then stalls with the socket open has still been recorded.
//!   Open responses are registered; a ticker flushes their counts every
//!   `journal_flush_secs` whether or not the stream is being polled, and
//!   shutdown flushes them and waits for the writer.
//! - The watermark (docs/credits.md, "Refunds"): each delivery carries a
//!   time W such that every paid response that started before W has had
//!   its first bytes journalled, fsynced and delivered, in this very batch
//!   or before. W is at most the start of the oldest open response whose
//!   first bytes are not journalled yet (one that is can no longer make its
//!   grant look unserved); it does not move while the writer is failing
//!   (events appended but not durable) or while a backlog remains (a full
//!   batch). The manager refunds a grant
//!   only once every node's W has passed its window, so a slow delivery,
//!   a stalled client or a full journal disk delays refunds, never turns a
//!   watched view into one.
//!
//! - Compaction: once everything written has been delivered and the file is
//!   past [`COMPACT_AT`], the forwarder empties it. It first writes the
//!   cursor back to 0 and only then truncates, with appends held off
//!   meanwhile, so a crash between the two can only make the node resend
//!   events the manager already has (it ignores them), never skip one. A
//!   node that is never quiet for the instant between a delivery and the
//!   next append keeps growing its file until it is (at ~150 bytes per
//!   event, ~150 MB per million paid responses).

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::{watch, Notify};

use crate::SharedState;

/// Events per delivery (the manager accepts up to 1000).
const BATCH: usize = 500;

/// A journal file this long, all delivered, is emptied.
const COMPACT_AT: u64 = 1 << 20;

/// One event, as the journal file and the manager both take it.
pub use shared::protocol::JournalEvent as Event;

/// What one open paid response has counted and not yet journalled.
struct Counter {
    grant: String,
    asset: String,
    /// Unix seconds when the response was registered.
    started_at: i64,
    pending: u64,
    first_at: i64,
    last_at: i64,
    /// Whether its first bytes were journalled (they are, at once).
    journalled: bool,
}

impl Counter {
    /// The pending delta as an event, if there is one.
    fn take(&mut self) -> Option<Event> {
        if self.pending == 0 {
            return None;
        }
        let e = Event {
            id: uuid::Uuid::new_v4().simple().to_string(),
            grant: Some(self.grant.clone()),
            asset: self.asset.clone(),
            bytes: self.pending,
            first_at: self.first_at,
            last_at: self.last_at,
        };
        self.pending = 0;
        self.journalled = true;
        Some(e)
    }
}

type Open = Mutex<HashMap<u64, Arc<Mutex<Counter>>>>;

/// The node's journal: a handle for responses, and the files behind it.
pub struct Journal {
    tx: Mutex<mpsc::Sender<Event>>,
    dir: PathBuf,
    /// Bytes of `views.jsonl` known to be on disk (fsynced).
    durable: Arc<AtomicU64>,
    /// Events handed to the writer since start (counted before sending, so
    /// an event the writer never took holds the watermark forever).
    appended: AtomicU64,
    /// Events the writer has fsynced since start.
    durable_events: Arc<AtomicU64>,
    /// The same count, for waiting on it.
    durable_rx: watch::Receiver<u64>,
    /// Whether the last write failed (disk full, I/O error); for health.
    pub write_failing: Arc<AtomicBool>,
    /// Paid responses still open, by registration number.
    open: Open,
    next_open: AtomicU64,
    /// The last watermark sent to the manager (unix seconds).
    watermark: AtomicI64,
    /// Held by the writer for each append and by compaction, so the file
    /// is never emptied under an append.
    appending: Arc<Mutex<()>>,
    /// Woken after each fsync, so the forwarder can deliver promptly.
    pub written: Arc<Notify>,
    /// Events held in memory, not yet on disk, past which new paid views
    /// are refused ([`Journal::accepts_new_views`]).
    max_unwritten: u64,
    /// Whether the last paid view asking was refused (so the log says when
    /// refusing starts and ends, once each).
    refusing: AtomicBool,
}

/// Events the journal holds in memory while its disk cannot be written
/// (about 200 bytes each), unless configured otherwise.
pub const MAX_UNWRITTEN: u64 = 100_000;

fn log_path(dir: &Path) -> PathBuf {
    dir.join("views.jsonl")
}

fn cursor_path(dir: &Path) -> PathBuf {
    dir.join("forwarded")
}

fn read_cursor(dir: &Path) -> u64 {
    std::fs::read_to_string(cursor_path(dir))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// Replaces the forwarded offset atomically and durably.
fn write_cursor(dir: &Path, offset: u64) -> std::io::Result<()> {
    shared::runtime::write_file_durably(&cursor_path(dir), offset.to_string().as_bytes())
}

impl Journal {
    /// Opens (or creates) `<storage_dir>/journal` and starts the writer.
    /// A line cut short by a crash is cut off, so appends start clean.
    pub fn open(storage_dir: &Path) -> std::io::Result<Journal> {
        let dir = storage_dir.join("journal");
        std::fs::create_dir_all(&dir)?;
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(log_path(&dir))?;
        let len = file.metadata()?.len();
        let whole = end_of_last_line(&file, len)?;
        if whole < len {
            tracing::warn!(
                cut = len - whole,
                "the view journal ends in a partial line (a crash while writing); cutting it"
            );
            file.set_len(whole as u64)?;
        }
        file.sync_all()?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        if read_cursor(&dir) > whole as u64 {
            // The journal is shorter than what was delivered of it (emptied
            // by hand, or restored): deliver it all again rather than let
            // new events fall under the old offset and never be sent.
            tracing::warn!("journal cursor beyond the journal; delivering it all again");
            write_cursor(&dir, 0)?;
        }
        let durable = Arc::new(AtomicU64::new(whole as u64));
        let durable_events = Arc::new(AtomicU64::new(0));
        let (durable_tx, durable_rx) = watch::channel(0u64);
        let write_failing = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Notify::new());
        let appending = Arc::new(Mutex::new(()));
        let (tx, rx) = mpsc::channel::<Event>();
        {
            let w = Writer {
                file,
                durable: durable.clone(),
                durable_events: durable_events.clone(),
                durable_tx,
                failing: write_failing.clone(),
                written: written.clone(),
                appending: appending.clone(),
            };
            std::thread::Builder::new()
                .name("view-journal".into())
                .spawn(move || w.run(rx))?;
        }
        Ok(Journal {
            tx: Mutex::new(tx),
            dir,
            durable,
            appended: AtomicU64::new(0),
            durable_events,
            durable_rx,
            write_failing,
            open: Mutex::new(HashMap::new()),
            next_open: AtomicU64::new(0),
            watermark: AtomicI64::new(0),
            appending,
            written,
            max_unwritten: MAX_UNWRITTEN,
            refusing: AtomicBool::new(false),
        })
    }

    /// Sets how many events may wait in memory for a failing disk.
    pub fn limit_unwritten(mut self, events: u64) -> Journal {
        self.max_unwritten = events;
        self
    }

    /// Events handed to the writer and not yet fsynced.
    pub fn unwritten(&self) -> u64 {
        self.appended
            .load(Ordering::Acquire)
            .saturating_sub(self.durable_events.load(Ordering::Acquire))
    }

    /// Whether a new paid view may start. While the journal's disk fails,
    /// events wait in memory; past the bound a paid view is refused rather
    /// than served unrecorded (a served view the manager never hears of is
    /// a view it would refund). Responses already open go on.
    pub fn accepts_new_views(&self) -> bool {
        let ok = !self.refusing_views();
        let was_refusing = self.refusing.swap(!ok, Ordering::AcqRel);
        if !ok && !was_refusing {
            tracing::error!(
                code = "journal_full",
                held = self.unwritten(),
                "the view journal cannot be written and holds its limit in memory; new paid views are refused until it can"
            );
        } else if ok && was_refusing {
            tracing::info!("the view journal is taking events again; paid views resume");
        }
        ok
    }

    /// Whether new paid views are refused now (for `/healthz`): from the
    /// count itself, since open responses keep adding events even when no
    /// new view has asked yet.
    pub fn refusing_views(&self) -> bool {
        self.unwritten() >= self.max_unwritten
    }

    /// The watermark this node may claim now, with the events that must be
    /// delivered for it to hold: `(candidate, events appended so far)`.
    /// The clock is read before the open set, and the open set before the
    /// count: a response registered after the clock read started no
    /// earlier than the candidate, and one that ended before the open set
    /// was read had appended its last event before the count is read.
    fn watermark_candidate(&self) -> (i64, u64) {
        let now = shared::runtime::unix_now();
        // Only responses whose first bytes are not journalled yet hold it
        // back: once they are, the grant counts as served whatever else
        // happens, and a client dripping one byte a minute must not be
        // able to hold every refund in the cluster.
        let oldest_open = self
            .open
            .lock()
            .expect("not poisoned")
            .values()
            .filter_map(|c| {
                let c = c.lock().expect("not poisoned");
                (!c.journalled).then_some(c.started_at)
            })
            .min();
        let appended = self.appended.load(Ordering::Acquire);
        (oldest_open.map_or(now, |s| s.min(now)), appended)
    }

    /// Journals what every open paid response has counted so far (the
    /// flush ticker, and shutdown).
    pub fn flush_open(&self) {
        let counters: Vec<_> = self
            .open
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        for c in counters {
            let e = c.lock().expect("not poisoned").take();
            if let Some(e) = e {
                let _ = self.append(e);
            }
        }
    }

    /// Waits until every event appended so far is on disk, up to `limit`.
    /// Returns whether it got there.
    pub async fn wait_durable(&self, limit: Duration) -> bool {
        self.until_durable(self.appended.load(Ordering::Acquire), limit)
            .await
    }

    /// Waits until the `seq`-th event appended since start is on disk, up
    /// to `limit`. Returns whether it got there.
    pub async fn until_durable(&self, seq: u64, limit: Duration) -> bool {
        let mut rx = self.durable_rx.clone();
        let reached = async { rx.wait_for(|d| *d >= seq).await.is_ok() };
        tokio::time::timeout(limit, reached).await.unwrap_or(false)
    }

    /// Empties the journal if everything in it has been delivered (the
    /// cursor is at `forwarded`, the end) and it is at least `min_len`
    /// long. Returns whether it did. The cursor goes back to 0 before the
    /// file is cut (module docs: a crash between can only cause resends).
    fn compact(&self, forwarded: u64, min_len: u64) -> std::io::Result<bool> {
        let _no_appends = self.appending.lock().expect("not poisoned");
        let durable = self.durable.load(Ordering::Acquire);
        if durable != forwarded || durable < min_len {
            return Ok(false);
        }
        self.mark_forwarded(0)?;
        let f = OpenOptions::new().write(true).open(log_path(&self.dir))?;
        f.set_len(0)?;
        f.sync_all()?;
        self.durable.store(0, Ordering::Release);
        tracing::info!(
            bytes = durable,
            "view journal delivered in full; emptied it"
        );
        Ok(true)
    }

    /// Queues `e` for the writer; returns its number since start (see
    /// [`until_durable`](Journal::until_durable)).
    fn append(&self, e: Event) -> u64 {
        let seq = self.appended.fetch_add(1, Ordering::AcqRel) + 1;
        if self.tx.lock().expect("not poisoned").send(e).is_err() {
            // Counted but never durable: the watermark stops here, so no
            // grant this node may have served is ever refunded.
            tracing::error!(
                code = "journal_writer_stopped",
                "the view journal writer has stopped; an event is lost and refunds are held"
            );
        }
        seq
    }

    /// Registers one paid response (see [`Served`]).
    pub fn served(self: &Arc<Self>, grant: String, asset: String) -> Served {
        let counter = Arc::new(Mutex::new(Counter {
            grant,
            asset,
            started_at: shared::runtime::unix_now(),
            pending: 0,
            first_at: 0,
            last_at: 0,
            journalled: false,
        }));
        let id = self.next_open.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .expect("not poisoned")
            .insert(id, counter.clone());
        Served {
            journal: self.clone(),
            id,
            counter,
        }
    }

    /// Paid responses still open (for `/metrics`).
    pub fn open_responses(&self) -> usize {
        self.open.lock().expect("not poisoned").len()
    }

    /// Durable events past the forwarded offset: (events, offset after them).
    fn pending(&self, max: usize) -> std::io::Result<(Vec<Event>, u64)> {
        let durable = self.durable.load(Ordering::Acquire);
        let mut from = read_cursor(&self.dir);
        if from > durable {
            // Only possible if the journal was replaced under us; resend all
            // (the manager ignores duplicates).
            tracing::warn!(
                from,
                durable,
                "journal cursor beyond the journal; starting over"
            );
            from = 0;
        }
        // Only this batch's lines are read: a backlog of a million events
        // waiting for the manager costs each delivery one batch, not the
        // whole backlog (reading it all each time made catch-up quadratic).
        let mut f = File::open(log_path(&self.dir))?;
        f.seek(SeekFrom::Start(from))?;
        let mut lines = BufReader::new(f.take(durable - from));
        let mut events = Vec::new();
        let mut offset = from;
        let mut line = Vec::new();
        while events.len() < max {
            line.clear();
            let n = lines.read_until(b'\n', &mut line)?;
            // A line without its end (the file cut under us, as compaction
            // at shutdown can) is not skipped: it stays for the next read.
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            offset += n as u64;
            match serde_json::from_slice::<Event>(&line) {
                Ok(e) => events.push(e),
                Err(e) => tracing::error!(offset, "unreadable journal line skipped: {e}"),
            }
        }
        Ok((events, offset))
    }

    fn mark_forwarded(&self, offset: u64) -> std::io::Result<()> {
        write_cursor(&self.dir, offset)
    }
}

/// Where the last whole line of `file` (`len` bytes) ends: 0 if it holds
/// none. Read backwards from the end, a block at a time, so opening a
/// journal that holds a long backlog reads one block, not the backlog.
fn end_of_last_line(file: &File, len: u64) -> std::io::Result<u64> {
    const BLOCK: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = &mut buf[..(end - start) as usize];
        std::os::unix::fs::FileExt::read_exact_at(file, block, start)?;
        if let Some(i) = block.iter().rposition(|b| *b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The writer thread's side of the journal.
struct Writer {
    file: File,
    durable: Arc<AtomicU64>,
    durable_events: Arc<AtomicU64>,
    durable_tx: watch::Sender<u64>,
    failing: Arc<AtomicBool>,
    written: Arc<Notify>,
    appending: Arc<Mutex<()>>,
}

impl Writer {
    /// Appends and fsyncs everything queued, batch by batch, then publishes
    /// the durable length (bytes first, then the event count, which is what
    /// the watermark reads). A failing disk is retried, never skipped.
    fn run(mut self, rx: mpsc::Receiver<Event>) {
        while let Ok(first) = rx.recv() {
            let mut buf = Vec::new();
            let mut n = 0u64;
            for e in std::iter::once(first).chain(rx.try_iter()) {
                serde_json::to_writer(&mut buf, &e).expect("events serialize");
                buf.push(b'\n');
                n += 1;
            }
            let _appending = self.appending.lock().expect("not poisoned");
            let len = self.durable.load(Ordering::Acquire);
            loop {
                let r = self
                    .file
                    .set_len(len)
                    .and_then(|_| self.file.write_all(&buf))
                    .and_then(|_| self.file.sync_data());
                match r {
                    Ok(()) => break,
                    Err(e) => {
                        metrics::counter!("viewnode_journal_write_errors_total").increment(1);
                        if !self.failing.swap(true, Ordering::AcqRel) {
                            // Once per run of failures: the alert. Refunds
                            // stay held (the watermark waits) until it heals.
                            tracing::error!(
                                code = "journal_write_failed",
                                "cannot write the view journal (retrying every second; refunds are held): {e}"
                            );
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            if self.failing.swap(false, Ordering::AcqRel) {
                tracing::info!("the view journal is writable again");
            }
            self.durable
                .store(len + buf.len() as u64, Ordering::Release);
            let total = self.durable_events.fetch_add(n, Ordering::AcqRel) + n;
            self.durable_tx.send_replace(total);
            drop(_appending);
            metrics::counter!("viewnode_journal_events_total").increment(n);
            self.written.notify_one();
        }
    }
}

/// One paid response's handle: counts the bytes it hands to its client.
/// The first bytes are journalled at once; later ones when the flush
/// ticker passes ([`Journal::flush_open`]) and when the response ends
/// (finished, or the client went away).
pub struct Served {
    journal: Arc<Journal>,
    id: u64,
    counter: Arc<Mutex<Counter>>,
}

impl Served {
    /// Counts `n` bytes handed out. The first ones are journalled at once:
    /// then it returns that event's number, to wait for it to be on disk.
    pub fn add(&mut self, n: usize) -> Option<u64> {
        if n == 0 {
            return None;
        }
        let now = shared::runtime::unix_now();
        let first = {
            let mut c = self.counter.lock().expect("not poisoned");
            if c.pending == 0 {
                c.first_at = now;
            }
            c.pending += n as u64;
            c.last_at = now;
            if c.journalled {
                None
            } else {
                c.take()
            }
        };
        first.map(|e| self.journal.append(e))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // Append before leaving the open set: the watermark reads the open
        // set, then the append count (Journal::watermark_candidate).
        let last = self.counter.lock().expect("not poisoned").take();
        if let Some(e) = last {
            let _ = self.journal.append(e);
        }
        self.journal
            .open
            .lock()
            .expect("not poisoned")
            .remove(&self.id);
    }
}

/// Journals open responses' counts every `journal_flush_secs` until `stop`.
pub async fn flush_ticker(st: SharedState, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(st.cfg.journal_flush_secs));
    loop {
        tokio::select! {
            _ = tick.tick() => st.journal.flush_open(),
            _ = stop.changed() => return,
        }
    }
}

/// Delivers the journal to the manager until `stop` fires.
pub async fn forward(st: SharedState, mut stop: watch::Receiver<bool>) {
    if st.cfg.manager_url.is_empty() {
        tracing::warn!("no manager_url: the view journal is kept but not delivered");
        return;
    }
    let every = Duration::from_secs(st.cfg.journal_forward_secs);
    let mut failing = false;
    loop {
        // Deliver everything durable now; a full batch means more is waiting.
        loop {
            match deliver(&st).await {
                Ok(full) => {
                    if failing {
                        tracing::info!("view journal delivered again");
                        failing = false;
                    }
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("cannot deliver the view journal (will retry): {e:#}");
                        failing = true;
                    }
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = st.journal.written.notified() => {
                // Let a burst of responses land in one delivery.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// One signed delivery, with the watermark it completes; returns whether
/// the batch was full.
pub async fn deliver(st: &SharedState) -> anyhow::Result<bool> {
    let journal = st.journal.clone();
    let (candidate, appended) = journal.watermark_candidate();
    // Read before the durable length (the writer publishes that first).
    let durable_events = journal.durable_events.load(Ordering::Acquire);
    let (events, offset) = tokio::task::spawn_blocking(move || journal.pending(BATCH)).await??;
    let full = events.len() >= BATCH;
    // This batch reaches the end of what is durable, and everything
    // appended before the candidate is durable: the candidate holds once
    // the manager has it. Otherwise the last watermark stands.
    let complete = !full && durable_events >= appended;
    let previous = st.journal.watermark.load(Ordering::Acquire);
    let watermark = if complete {
        candidate.max(previous)
    } else {
        previous
    };
    let n = events.len();
    let body = serde_json::to_vec(&shared::protocol::JournalBatch {
        events,
        watermark,
        now: shared::runtime::unix_now(),
    })?;
    let r = st
        .post_to_manager("journal", body, Duration::from_secs(30))
        .await?;
    if !r.status.is_success() {
        anyhow::bail!(
            "the manager answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    st.journal.watermark.store(watermark, Ordering::Release);
    metrics::gauge!("viewnode_journal_watermark_seconds").set(watermark as f64);
    if n > 0 {
        let journal = st.journal.clone();
        tokio::task::spawn_blocking(move || {
            journal.mark_forwarded(offset)?;
            journal.compact(offset, COMPACT_AT)
        })
        .await??;
        tracing::debug!(count = n, watermark, "view journal delivered");
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn wait_durable(j: &Journal, n: usize) -> Vec<Event> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (events, _) = j.pending(1000).unwrap();
            if events.len() >= n || Instant::now() > deadline {
                return events;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_backlog_is_delivered_batch_by_batch_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        for i in 0..1200 {
            let mut s = j.served(format!("g{i}"), "a".into());
            s.add(1);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while j.unwritten() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut seen = Vec::new();
        let mut batches = Vec::new();
        loop {
            let (events, offset) = j.pending(BATCH).unwrap();
            if events.is_empty() {
                break;
            }
            batches.push(events.len());
            seen.extend(events.into_iter().map(|e| e.grant.unwrap()));
            j.mark_forwarded(offset).unwrap();
        }
        assert_eq!(batches, vec![500, 500, 200]);
        let want: Vec<String> = (0..1200).map(|i| format!("g{i}")).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn events_survive_reopen_and_forwarding_moves_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Arc::new(Journal::open(dir.path()).unwrap());
            let mut s = j.served("g1".into(), "a1".into());
            s.add(100);
            s.add(50);
            drop(s);
            let mut s = j.served("g2".into(), "a1".into());
            s.add(0);
            drop(s); // nothing served: no event
                     // The first bytes at once, the rest when the response ends.
            let events = wait_durable(&j, 2);
            assert_eq!(events.len(), 2);
            assert_eq!(
                events.iter().map(|e| e.bytes).collect::<Vec<_>>(),
                vec![100, 50]
            );
            assert!(events.iter().all(|e| e.grant.as_deref() == Some("g1")));
        }
        // A crash mid-line leaves a partial line; reopening cuts it.
        let log = log_path(&dir.path().join("journal"));
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"id\":\"half").unwrap();
        drop(f);
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        let mut s = j.served("g3".into(), "a2".into());
        s.add(7);
        drop(s);
        let events = wait_durable(&j, 3);
        assert_eq!(
            events.iter().map(|e| e.bytes).collect::<Vec<_>>(),
            vec![100, 50, 7]
        );
        let (_, offset) = j.pending(2).unwrap();
        j.mark_forwarded(offset).unwrap();
        let (rest, _) = j.pending(1000).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].grant.as_deref(), Some("g3"));
    }

    #[test]
    fn the_last_whole_line_is_found_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let at = |text: &[u8]| {
            std::fs::write(&path, text).unwrap();
            let f = File::open(&path).unwrap();
            end_of_last_line(&f, text.len() as u64).unwrap()
        };
        assert_eq!(at(b""), 0);
        assert_eq!(at(b"no newline"), 0);
        assert_eq!(at(b"a\nb\n"), 4);
        // A partial line longer than a block, after whole ones.
        let mut text = b"first\nsecond\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', 200 * 1024));
        assert_eq!(at(&text), 13);
        let mut text = vec![b'y'; 130 * 1024];
        text.push(b'\n');
        assert_eq!(at(&text), 130 * 1024 + 1);
        text.extend(b"tail");
        assert_eq!(at(&text), 130 * 1024 + 1);
    }

    fn serve(j: &Arc<Journal>, grant: &str, bytes: usize) {
        let mut s = j.served(grant.into(), "a".into());
        s.add(bytes);
    }

    #[test]
    fn a_stalled_response_is_journalled_from_its_first_byte_and_holds_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        let (idle, _) = j.watermark_candidate();
        assert!(idle >= shared::runtime::unix_now() - 1, "nothing open: now");
        let mut s = j.served("g".into(), "a".into());
        let started = s.counter.lock().unwrap().started_at;
        std::thread::sleep(Duration::from_millis(1100));
        let (w, _) = j.watermark_candidate();
        assert_eq!(w, started, "held while nothing of it is journalled");
        s.add(1 << 20);
        s.add(10);
        // The client stalls: nothing polls the stream, nothing is dropped.
        let events = wait_durable(&j, 1);
        assert_eq!(events.len(), 1, "the first bytes, at once");
        assert_eq!(events[0].bytes, 1 << 20);
        let (w, appended) = j.watermark_candidate();
        assert!(w > started, "its grant is served now: no longer held");
        assert_eq!(appended, 1, "and the first event must be delivered first");
        j.flush_open();
        let events = wait_durable(&j, 2);
        assert_eq!(
            events[1].bytes, 10,
            "the ticker journals what the stream counted"
        );
        drop(s);
        let (_, appended) = j.watermark_candidate();
        assert_eq!(appended, 2);
    }

    #[test]
    fn a_fully_delivered_journal_is_emptied_and_nothing_undelivered_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_path(&dir.path().join("journal"));
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        serve(&j, "g1", 10);
        serve(&j, "g2", 20);
        wait_durable(&j, 2);
        let (_, all) = j.pending(1000).unwrap();
        let (_, first) = j.pending(1).unwrap();

        // Not everything delivered, or too short: kept.
        j.mark_forwarded(first).unwrap();
        assert!(!j.compact(first, 0).unwrap());
        j.mark_forwarded(all).unwrap();
        assert!(!j.compact(all, all + 1).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), all);

        // Everything delivered: emptied, cursor back at 0, and appends
        // carry on from the start.
        assert!(j.compact(all, 0).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(read_cursor(&j.dir), 0);
        serve(&j, "g3", 30);
        let events = wait_durable(&j, 1);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].grant.as_deref(), Some("g3"));
        assert!(std::fs::metadata(&log).unwrap().len() > 0);

        // A cursor beyond the file (emptied by hand after delivery) is put
        // back at 0 on open, so events appended later are not hidden under
        // it (here it would land inside the next event's line).
        drop(j);
        let len = std::fs::metadata(&log).unwrap().len();
        write_cursor(&dir.path().join("journal"), len + 1).unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        serve(&j, "g4", 40);
        let events = wait_durable(&j, 2);
        assert_eq!(
            events.iter().map(|e| e.bytes).collect::<Vec<_>>(),
            vec![30, 40]
        );
    }
}
