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
//! - Compaction: once everything written has been delivered and the file is
//!   past [`COMPACT_AT`], the forwarder empties it. It first writes the
//!   cursor back to 0 and only then truncates, with appends held off
//!   meanwhile, so a crash between the two can only make the node resend
//!   events the manager already has (it ignores them), never skip one. A
//!   node that is never quiet for the instant between a delivery and the
//!   next append keeps growing its file until it is (at ~150 bytes per
//!   event, ~150 MB per million paid responses).

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::SharedState;

/// Events per delivery (the manager accepts up to 1000).
const BATCH: usize = 500;

/// A journal file this long, all delivered, is emptied.
const COMPACT_AT: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub grant: Option<String>,
    pub asset: String,
    pub bytes: u64,
    pub first_at: i64,
    pub last_at: i64,
}

/// The node's journal: a handle for responses, and the files behind it.
pub struct Journal {
    tx: Mutex<mpsc::Sender<Event>>,
    dir: PathBuf,
    /// Bytes of `views.jsonl` known to be on disk (fsynced).
    durable: Arc<AtomicU64>,
    /// Held by the writer for each append and by compaction, so the file
    /// is never emptied under an append.
    appending: Arc<Mutex<()>>,
    /// Woken after each fsync, so the forwarder can deliver promptly.
    pub written: Arc<Notify>,
}

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
    let tmp = dir.join("forwarded.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(offset.to_string().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, cursor_path(dir))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl Journal {
    /// Opens (or creates) `<storage_dir>/journal` and starts the writer.
    /// A line cut short by a crash is cut off, so appends start clean.
    pub fn open(storage_dir: &Path) -> std::io::Result<Journal> {
        let dir = storage_dir.join("journal");
        std::fs::create_dir_all(&dir)?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(log_path(&dir))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            tracing::warn!(
                cut = text.len() - whole,
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
        let written = Arc::new(Notify::new());
        let appending = Arc::new(Mutex::new(()));
        let (tx, rx) = mpsc::channel::<Event>();
        {
            let durable = durable.clone();
            let written = written.clone();
            let appending = appending.clone();
            std::thread::Builder::new()
                .name("view-journal".into())
                .spawn(move || writer(rx, file, durable, written, appending))?;
        }
        Ok(Journal {
            tx: Mutex::new(tx),
            dir,
            durable,
            appending,
            written,
        })
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

    fn append(&self, e: Event) {
        if self.tx.lock().expect("not poisoned").send(e).is_err() {
            tracing::error!("the view journal writer has stopped; an event is lost");
        }
    }

    /// A counter for one paid response (see [`Served`]).
    pub fn served(self: &Arc<Self>, grant: String, asset: String, flush: Duration) -> Served {
        Served {
            journal: self.clone(),
            grant,
            asset,
            pending: 0,
            first_at: 0,
            last_at: 0,
            last_flush: Instant::now(),
            flush,
        }
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
        let mut f = File::open(log_path(&self.dir))?;
        f.seek(SeekFrom::Start(from))?;
        let mut buf = vec![0u8; (durable - from) as usize];
        f.read_exact(&mut buf)?;
        let mut events = Vec::new();
        let mut offset = from;
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if events.len() >= max {
                break;
            }
            offset += line.len() as u64;
            match serde_json::from_slice::<Event>(line) {
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

/// Appends and fsyncs everything queued, batch by batch, then publishes
/// the durable length. A failing disk is retried, never skipped.
fn writer(
    rx: mpsc::Receiver<Event>,
    mut file: File,
    durable: Arc<AtomicU64>,
    written: Arc<Notify>,
    appending: Arc<Mutex<()>>,
) {
    while let Ok(first) = rx.recv() {
        let mut buf = Vec::new();
        let mut n = 0u64;
        for e in std::iter::once(first).chain(rx.try_iter()) {
            serde_json::to_writer(&mut buf, &e).expect("events serialize");
            buf.push(b'\n');
            n += 1;
        }
        let _appending = appending.lock().expect("not poisoned");
        let len = durable.load(Ordering::Acquire);
        loop {
            let r = file
                .set_len(len)
                .and_then(|_| file.write_all(&buf))
                .and_then(|_| file.sync_data());
            match r {
                Ok(()) => break,
                Err(e) => {
                    metrics::counter!("viewnode_journal_write_errors_total").increment(1);
                    tracing::error!("cannot write the view journal (retrying): {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        durable.store(len + buf.len() as u64, Ordering::Release);
        drop(_appending);
        metrics::counter!("viewnode_journal_events_total").increment(n);
        written.notify_one();
    }
}

/// Counts what one paid response hands to its client, and journals it as
/// delta events: every `flush` while it streams, and when it is dropped
/// (finished, or the client went away).
pub struct Served {
    journal: Arc<Journal>,
    grant: String,
    asset: String,
    pending: u64,
    first_at: i64,
    last_at: i64,
    last_flush: Instant,
    flush: Duration,
}

impl Served {
    pub fn add(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = shared::runtime::unix_now();
        if self.pending == 0 {
            self.first_at = now;
        }
        self.pending += n as u64;
        self.last_at = now;
        if self.last_flush.elapsed() >= self.flush {
            self.emit();
        }
    }

    fn emit(&mut self) {
        self.last_flush = Instant::now();
        if self.pending == 0 {
            return;
        }
        self.journal.append(Event {
            id: uuid::Uuid::new_v4().simple().to_string(),
            grant: Some(self.grant.clone()),
            asset: self.asset.clone(),
            bytes: self.pending,
            first_at: self.first_at,
            last_at: self.last_at,
        });
        self.pending = 0;
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.emit();
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

/// One signed delivery; returns whether the batch was full.
async fn deliver(st: &SharedState) -> anyhow::Result<bool> {
    let journal = st.journal.clone();
    let (events, offset) = tokio::task::spawn_blocking(move || journal.pending(BATCH)).await??;
    let full = events.len() >= BATCH;
    let body = serde_json::to_vec(&serde_json::json!({ "events": events }))?;
    let r = st
        .post_to_manager("journal", body, Duration::from_secs(30))
        .await?;
    let status = r.status();
    if !status.is_success() {
        anyhow::bail!(
            "the manager answered {status}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    if !events.is_empty() {
        let journal = st.journal.clone();
        tokio::task::spawn_blocking(move || {
            journal.mark_forwarded(offset)?;
            journal.compact(offset, COMPACT_AT)
        })
        .await??;
        tracing::debug!(count = events.len(), "view journal delivered");
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn events_survive_reopen_and_forwarding_moves_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Arc::new(Journal::open(dir.path()).unwrap());
            let mut s = j.served("g1".into(), "a1".into(), Duration::from_secs(3600));
            s.add(100);
            s.add(50);
            drop(s);
            let mut s = j.served("g2".into(), "a1".into(), Duration::from_secs(3600));
            s.add(0);
            drop(s); // nothing served: no event
            let events = wait_durable(&j, 1);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].bytes, 150);
            assert_eq!(events[0].grant.as_deref(), Some("g1"));
        }
        // A crash mid-line leaves a partial line; reopening cuts it.
        let log = log_path(&dir.path().join("journal"));
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"id\":\"half").unwrap();
        drop(f);
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        let mut s = j.served("g3".into(), "a2".into(), Duration::from_secs(3600));
        s.add(7);
        drop(s);
        let events = wait_durable(&j, 2);
        assert_eq!(
            events.iter().map(|e| e.bytes).collect::<Vec<_>>(),
            vec![150, 7]
        );
        let (_, offset) = j.pending(1).unwrap();
        j.mark_forwarded(offset).unwrap();
        let (rest, _) = j.pending(1000).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].grant.as_deref(), Some("g3"));
    }

    fn serve(j: &Arc<Journal>, grant: &str, bytes: usize) {
        let mut s = j.served(grant.into(), "a".into(), Duration::from_secs(3600));
        s.add(bytes);
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
