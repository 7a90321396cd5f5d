//! [`AuditLog`]: a cheap handle that enqueues events, and the writer thread that gives them
//! `seq`, `timestamp` and `prev_hash`, appends them, checkpoints, rotates and recovers.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    fs::File,
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ed25519_dalek::SigningKey;

use super::{
    AuditError, AuditOptions,
    aggregate::KernelDenyAggregator,
    chain::{Clock, key_id, line_hash, render_checkpoint, render_event_into},
    event::{Action, AuditEvent, EventKind},
    fold::{Folder, Offer},
    key::{fsync_parent, load_signing_key},
    recover::{self, open_live, rotated_file_name},
};

/// Events that may wait for the writer before `record` refuses more.
const QUEUE_CAPACITY: usize = 65_536;
/// Events already queued when the log started failing that are kept for the retry.
const RETRY_CAPACITY: usize = 65_536;
/// How often a failing log retries.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// How often kernel refusals are drained into records.
const DENY_WINDOW: Duration = Duration::from_secs(1);
/// How long to wait before retrying a rotation that failed.
const ROTATE_RETRY: Duration = Duration::from_secs(10);
/// After writing a batch the writer waits this long before taking the next one, so that a
/// busy proxy hands it records without waking it for each (a futex wake and a context switch
/// on the request path) and a batch costs one `write`. Records reach the file this much later.
const COALESCE: Duration = Duration::from_millis(10);
/// How often the writer checks that its open file is still the one at the path (two `stat`s).
const LIVE_CHECK: Duration = Duration::from_millis(500);

/// What the writer has done, for `enforcer status` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditStats {
    /// Records written by this process, checkpoints included.
    pub records_written: u64,
    /// `seq` of the last record in the chain (0 before the first record ever).
    pub last_seq: u64,
    /// Hash of the last record: the value an external anchor should keep.
    pub head_hash: String,
    /// Checkpoints written by this process.
    pub checkpoints: u64,
    /// `seq` of the last checkpoint written by this process.
    pub last_checkpoint_seq: Option<u64>,
    /// Whether writes are failing now.
    pub failing: bool,
    /// Records refused by [`AuditLog::record`] (failing log or full queue).
    pub refused: u64,
    /// Records lost: queued before a failure, beyond what the retry keeps.
    pub lost: u64,
}

/// The audit log. Clones share one writer; every method is callable from any thread and
/// none needs a tokio runtime. [`record`](Self::record) never blocks; [`flush`](Self::flush)
/// and [`close`](Self::close) do (call them from `spawn_blocking` in async code).
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Sees every event offered to `record` (metrics count decisions here).
    observer: std::sync::OnceLock<Observer>,
}

/// A callback that sees every recorded event.
pub type Observer = Box<dyn Fn(&AuditEvent) + Send + Sync>;

struct Shared {
    failing: AtomicBool,
    closed: AtomicBool,
    /// Set when the writer thread ends, including by a panic.
    stopped: AtomicBool,
    refused: AtomicU64,
    stats: Mutex<AuditStats>,
    last_error: Mutex<String>,
    denies: KernelDenyAggregator,
    folder: Folder,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, AuditStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

enum Msg {
    Record(Box<AuditEvent>),
    Flush(mpsc::Sender<Result<(), AuditError>>),
    Close,
}

impl AuditLog {
    /// Reads the key, opens (creating the directory and file if needed) and locks the live
    /// file, seals off a torn final record (see the module docs), recovers the chain head,
    /// and starts the writer thread.
    pub fn open(opts: AuditOptions) -> Result<AuditLog, AuditError> {
        let key = load_signing_key(&opts.key_path)?;
        let live = open_live(&opts.path)?;
        let shared = Arc::new(Shared {
            failing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            stats: Mutex::new(AuditStats {
                last_seq: live.next_seq - 1,
                head_hash: live.head.clone(),
                ..AuditStats::default()
            }),
            last_error: Mutex::new(String::new()),
            denies: KernelDenyAggregator::new(),
            folder: Folder::new(opts.agent_budget),
        });
        let now = Instant::now();
        let mut writer = Writer {
            key_id: key_id(&key.verifying_key()),
            key,
            file: live.file,
            file_len: live.len,
            file_first_seq: live.first_seq,
            next_seq: live.next_seq,
            head: live.head,
            since_checkpoint: 0,
            pending_since: None,
            needs_truncate: false,
            needs_sync: false,
            needs_reopen: false,
            batch: Batch::default(),
            clock: Clock::default(),
            retry: VecDeque::new(),
            lost: 0,
            failing_since: None,
            next_retry: now,
            next_deny_drain: now + DENY_WINDOW,
            rotate_not_before: now,
            next_live_check: now + LIVE_CHECK,
            needs_restore: None,
            shared: Arc::clone(&shared),
            opts,
        };
        // Before anything else: records no signature covers are named, so that the next
        // checkpoint (which signs the chain through them) is not read as vouching for them.
        let mut opened_with = false;
        if let Some((first, last)) = live.unsealed {
            let reason = format!(
                "records {first}..{last} follow the last checkpoint: the daemon did not stop \
                 cleanly, or they were added while it was stopped; they are not attested"
            );
            tracing::warn!(path = %writer.opts.path.display(), "audit log: {reason}");
            let event = AuditEvent::new(EventKind::Daemon)
                .action(Action::Unsealed)
                .first_seq(first)
                .last_seq(last)
                .reason(reason);
            writer.write_event(event, false);
            opened_with = true;
        }
        if let Some(sealed) = &live.sealed {
            let reason = sealed.describe();
            tracing::warn!(path = %writer.opts.path.display(), "audit log: {reason}");
            let event = AuditEvent::new(EventKind::Daemon)
                .action(Action::Sealed)
                .reason(reason);
            writer.write_event(event, false);
            opened_with = true;
        }
        if opened_with {
            writer.checkpoint().map_err(|e| AuditError::Recover {
                path: writer.opts.path.clone(),
                message: format!("cannot record what was found at open: {e}"),
            })?;
        }
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(AuditError::Spawn)?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                tx,
                shared,
                thread: Mutex::new(Some(thread)),
                observer: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Installs the observer that sees every event offered to [`AuditLog::record`]. Only the
    /// first call takes effect.
    pub fn set_observer(&self, observer: Observer) {
        let _ = self.inner.observer.set(observer);
    }

    /// Enqueues an event without blocking, after scrubbing it (see [`AuditEvent::scrub`]).
    /// Errs when the log is failing, its queue is full or it is closed, so that strict mode
    /// can deny; the event is then not recorded.
    pub fn record(&self, mut event: AuditEvent) -> Result<(), AuditError> {
        let shared = &self.inner.shared;
        if shared.closed.load(Ordering::Acquire) || shared.stopped.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        if event.event == EventKind::Checkpoint {
            return Err(AuditError::Reserved);
        }
        // Decisions are counted even when the log cannot take them.
        if let Some(observe) = self.inner.observer.get() {
            observe(&event);
        }
        if shared.failing.load(Ordering::Acquire) {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            return Err(AuditError::Failing {
                reason: shared
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            });
        }
        event.scrub();
        // Repeated denials, and an agent's denials past its budget, wait in the folder for
        // the end of the second: they never take a place in the queue from other records.
        let event = if Folder::folds(&event) {
            match shared.folder.offer(event) {
                Offer::Write(event) => event,
                Offer::Folded => return Ok(()),
            }
        } else {
            Box::new(event)
        };
        match self.inner.tx.try_send(Msg::Record(event)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                Err(AuditError::Backlog {
                    capacity: QUEUE_CAPACITY,
                })
            }
            Err(TrySendError::Disconnected(_)) => Err(AuditError::Closed),
        }
    }

    /// Notes one kernel refusal; the writer turns each second's refusals into one
    /// `kernel_deny` record per agent, destination and reason, with `count`.
    pub fn kernel_deny(
        &self,
        agent_id: &str,
        pid: u32,
        comm: &str,
        dest: SocketAddr,
        reason: &'static str,
    ) {
        // The observer sees each refusal as it happens (the record folds them per second).
        if let Some(observe) = self.inner.observer.get() {
            observe(
                &AuditEvent::new(EventKind::KernelDeny)
                    .agent_id(agent_id)
                    .pid(pid)
                    .comm(comm)
                    .dest(dest.to_string())
                    .policy_result(crate::audit::PolicyResult::Deny)
                    .reason(reason),
            );
        }
        self.inner
            .shared
            .denies
            .note(agent_id, pid, comm, dest, reason);
    }

    /// Notes `count` kernel refusals of one agent that were never reported (the event ring
    /// was full); written within a second as one `kernel_deny` record with `action: lost`.
    pub fn kernel_lost(&self, agent_id: &str, count: u64) {
        self.inner.shared.denies.lost(agent_id, count);
    }

    /// Whether records are being written: not failing, not closed.
    pub fn healthy(&self) -> bool {
        let shared = &self.inner.shared;
        !shared.failing.load(Ordering::Acquire)
            && !shared.closed.load(Ordering::Acquire)
            && !shared.stopped.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> AuditStats {
        let shared = &self.inner.shared;
        let mut stats = shared.stats().clone();
        stats.failing = shared.failing.load(Ordering::Acquire);
        stats.refused = shared.refused.load(Ordering::Relaxed);
        stats
    }

    /// Blocks until every event enqueued before the call is written, checkpointed and
    /// fsynced. Errs if the log is failing or closed.
    pub fn flush(&self) -> Result<(), AuditError> {
        let (ack_tx, ack_rx) = mpsc::channel();
        self.inner
            .tx
            .send(Msg::Flush(ack_tx))
            .map_err(|_| AuditError::Closed)?;
        ack_rx.recv().map_err(|_| AuditError::Closed)?
    }

    /// Writes a final checkpoint, fsyncs, and stops the writer. Idempotent; later
    /// [`record`](Self::record) calls return [`AuditError::Closed`].
    pub fn close(&self) {
        self.inner.close();
    }
}

impl Inner {
    fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            // Errs only if the writer is gone already; join either way.
            let _ = self.tx.send(Msg::Close);
            if handle.join().is_err() {
                tracing::error!(
                    "audit writer thread panicked; the log may lack a final checkpoint"
                );
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}

/// Marks the writer stopped when its thread ends, whether it returns or unwinds.
struct StoppedGuard(Arc<Shared>);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
    }
}

/// A failure in progress.
#[derive(Clone)]
struct Failure {
    since: Instant,
    error: String,
    /// `refused` when it began, so the `resumed` record counts this failure's refusals.
    refused_before: u64,
    lost_before: u64,
}

struct Writer {
    opts: AuditOptions,
    key: SigningKey,
    key_id: String,
    file: File,
    /// Bytes of whole records in `file`; after a failed write the file is cut back to it.
    file_len: u64,
    file_first_seq: Option<u64>,
    next_seq: u64,
    head: String,
    /// Records (not checkpoints) since the last checkpoint.
    since_checkpoint: u64,
    /// When the oldest unsealed record was written.
    pending_since: Option<Instant>,
    needs_truncate: bool,
    needs_sync: bool,
    needs_reopen: bool,
    /// Records rendered since the last write.
    batch: Batch,
    clock: Clock,
    /// Events queued before a failure, waiting for the retry.
    retry: VecDeque<AuditEvent>,
    lost: u64,
    failing_since: Option<Failure>,
    next_retry: Instant,
    next_deny_drain: Instant,
    rotate_not_before: Instant,
    next_live_check: Instant,
    /// The live file was found deleted or replaced and is not restored yet.
    needs_restore: Option<Gone>,
    shared: Arc<Shared>,
}

/// What happened to the live file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    Deleted,
    Replaced,
}

/// Records rendered but not yet written: the writer makes one `write` per batch.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    /// The events whose lines are in `buf`; if the write fails they go back to the retry.
    events: Vec<AuditEvent>,
    /// The chain before the first line in `buf`, restored if the write fails.
    base: Option<ChainState>,
    records: u64,
    checkpoints: u64,
    last_checkpoint_seq: Option<u64>,
}

struct ChainState {
    next_seq: u64,
    head: String,
    since_checkpoint: u64,
    pending_since: Option<Instant>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let _guard = StoppedGuard(Arc::clone(&self.shared));
        'outer: loop {
            let timeout = self.next_wakeup().saturating_duration_since(Instant::now());
            let busy = match rx.recv_timeout(timeout) {
                Ok(msg) => {
                    if !self.handle(msg) {
                        break;
                    }
                    // Take what else is queued before looking at the clock again.
                    for _ in 0..4096 {
                        match rx.try_recv() {
                            Ok(msg) => {
                                if !self.handle(msg) {
                                    break 'outer;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    true
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            self.tick(Instant::now());
            self.end_batch();
            if busy {
                std::thread::sleep(COALESCE);
            }
        }
        // Close: what is still queued, the last refusals, a final checkpoint, fsync.
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Record(event) = msg {
                self.append(*event);
            }
        }
        self.drain_denies();
        if self.failing() {
            self.retry_now();
        }
        if !self.failing()
            && let Err(e) = self.checkpoint().and_then(|()| self.file.sync_all())
        {
            self.fail(&e);
        }
        if self.failing() {
            tracing::error!(
                path = %self.opts.path.display(),
                pending = self.retry.len(),
                "audit log closed while failing; the queued records were not written"
            );
        }
    }

    /// Handles one message; false means stop.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Record(event) => {
                self.append(*event);
                true
            }
            Msg::Flush(ack) => {
                self.check_live();
                self.drain_denies();
                if self.failing() {
                    self.retry_now();
                }
                let result = if self.failing() {
                    Err(self.failing_error())
                } else {
                    match self.checkpoint().and_then(|()| self.sync()) {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            self.fail(&e);
                            Err(self.failing_error())
                        }
                    }
                };
                let _ = ack.send(result);
                true
            }
            Msg::Close => false,
        }
    }

    fn next_wakeup(&self) -> Instant {
        let mut at = self.next_deny_drain.min(self.next_live_check);
        if self.failing() {
            // The checkpoint waits for the retry.
            at = at.min(self.next_retry);
        } else if let Some(since) = self.pending_since {
            at = at.min(since + self.opts.checkpoint_interval);
        }
        at
    }

    fn tick(&mut self, now: Instant) {
        if now >= self.next_live_check {
            self.next_live_check = now + LIVE_CHECK;
            self.check_live();
        }
        if now >= self.next_deny_drain {
            self.next_deny_drain = now + DENY_WINDOW;
            self.drain_denies();
        }
        if self.failing() {
            if now >= self.next_retry {
                self.retry_now();
            }
            return;
        }
        if self
            .pending_since
            .is_some_and(|since| now >= since + self.opts.checkpoint_interval)
            && let Err(e) = self.checkpoint()
        {
            self.fail(&e);
        }
    }

    fn drain_denies(&mut self) {
        for event in self.shared.denies.drain() {
            self.append(event);
        }
        for event in self.shared.folder.drain() {
            self.append(event);
        }
    }

    /// Renders one event into the batch, or keeps it for the retry when the log is failing.
    fn append(&mut self, event: AuditEvent) {
        if self.failing() {
            self.keep_for_retry(event);
            return;
        }
        self.write_event(event, true);
        if self.opts.checkpoint_records > 0
            && self.since_checkpoint >= self.opts.checkpoint_records
            && let Err(e) = self.checkpoint()
        {
            self.fail(&e);
            return;
        }
        self.maybe_rotate();
    }

    fn keep_for_retry(&mut self, event: AuditEvent) {
        if self.retry.len() < RETRY_CAPACITY {
            self.retry.push_back(event);
        } else {
            self.lost += 1;
            self.shared.stats().lost = self.lost;
        }
    }

    /// Writes the batch, then rotates if the file is due.
    fn end_batch(&mut self) {
        if let Err(e) = self.commit() {
            self.fail(&e);
            return;
        }
        self.maybe_rotate();
    }

    /// Renders one record (not a checkpoint) into the batch as record `next_seq`. `keep`:
    /// whether the event goes back to the retry if the batch cannot be written (the writer's
    /// own `resumed` and `sealed` records are made afresh instead).
    fn write_event(&mut self, event: AuditEvent, keep: bool) {
        let start = self.begin_line();
        render_event_into(
            &mut self.batch.buf,
            self.next_seq,
            self.clock.now(),
            &event,
            &self.head,
        );
        self.end_line(start);
        self.since_checkpoint += 1;
        self.pending_since.get_or_insert_with(Instant::now);
        if keep {
            self.batch.events.push(event);
        }
    }

    /// Appends a signed checkpoint over the records since the last one, writes the batch
    /// and fsyncs.
    fn checkpoint(&mut self) -> std::io::Result<()> {
        if self.since_checkpoint > 0 {
            let seq = self.next_seq;
            let line =
                render_checkpoint(seq, self.clock.now(), &self.head, &self.key, &self.key_id);
            let start = self.begin_line();
            self.batch.buf.extend_from_slice(&line);
            self.end_line(start);
            self.since_checkpoint = 0;
            self.pending_since = None;
            self.batch.checkpoints += 1;
            self.batch.last_checkpoint_seq = Some(seq);
        }
        self.commit()?;
        self.sync()
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if self.needs_sync {
            self.file.sync_data()?;
            self.needs_sync = false;
        }
        Ok(())
    }

    /// Where the next line starts in the batch; remembers the chain before the batch.
    fn begin_line(&mut self) -> usize {
        if self.batch.base.is_none() {
            self.batch.base = Some(ChainState {
                next_seq: self.next_seq,
                head: self.head.clone(),
                since_checkpoint: self.since_checkpoint,
                pending_since: self.pending_since,
            });
        }
        self.batch.buf.len()
    }

    /// Seals the line that starts at `start`: hashes it, ends it with a newline, and moves
    /// the head on.
    fn end_line(&mut self, start: usize) {
        self.head = line_hash(&self.batch.buf[start..]);
        self.batch.buf.push(b'\n');
        self.next_seq += 1;
        self.batch.records += 1;
    }

    /// Writes the batch with one `write`. On failure the file is cut back to its last whole
    /// record (now, or before the next write), the chain is put back as it was before the
    /// batch, and the batch's events go to the front of the retry.
    fn commit(&mut self) -> std::io::Result<()> {
        if self.batch.buf.is_empty() {
            return Ok(());
        }
        let result = self.write_batch();
        let mut batch = std::mem::take(&mut self.batch);
        let base = batch.base.take().expect("a batch with lines has a base");
        match result {
            Ok(()) => {
                if self.file_len == 0 {
                    self.file_first_seq = Some(base.next_seq);
                }
                self.file_len += batch.buf.len() as u64;
                self.needs_sync = true;
                let mut stats = self.shared.stats();
                stats.records_written += batch.records;
                stats.last_seq = self.next_seq - 1;
                stats.head_hash.clone_from(&self.head);
                stats.checkpoints += batch.checkpoints;
                if batch.last_checkpoint_seq.is_some() {
                    stats.last_checkpoint_seq = batch.last_checkpoint_seq;
                }
                drop(stats);
                // Keep the buffer's capacity for the next batch.
                batch.buf.clear();
                self.batch.buf = batch.buf;
                Ok(())
            }
            Err(e) => {
                self.next_seq = base.next_seq;
                self.head = base.head;
                self.since_checkpoint = base.since_checkpoint;
                self.pending_since = base.pending_since;
                for event in batch.events.into_iter().rev() {
                    if self.retry.len() < RETRY_CAPACITY {
                        self.retry.push_front(event);
                    } else {
                        self.lost += 1;
                    }
                }
                self.shared.stats().lost = self.lost;
                Err(e)
            }
        }
    }

    fn write_batch(&mut self) -> std::io::Result<()> {
        if let Some(gone) = self.needs_restore {
            return Err(std::io::Error::other(format!(
                "the live file was {} and could not be recreated",
                gone.as_str()
            )));
        }
        if self.needs_reopen {
            return Err(std::io::Error::other(
                "the live file could not be reopened after rotation",
            ));
        }
        if self.needs_truncate {
            self.file.set_len(self.file_len)?;
            self.needs_truncate = false;
        }
        if let Err(e) = self.file.write_all(&self.batch.buf) {
            self.needs_truncate = self.file.set_len(self.file_len).is_err();
            return Err(e);
        }
        Ok(())
    }

    fn maybe_rotate(&mut self) {
        let now = Instant::now();
        if self.opts.rotate_bytes == 0
            || self.file_len + (self.batch.buf.len() as u64) < self.opts.rotate_bytes
            || now < self.rotate_not_before
            || self.failing()
        {
            return;
        }
        if let Err(e) = self.checkpoint() {
            self.fail(&e);
            return;
        }
        let first = self.file_first_seq.unwrap_or(self.next_seq - 1);
        let target = rotated_file_name(&self.opts.path, first);
        if target.exists() {
            tracing::warn!(
                target = %target.display(),
                "audit log not rotated: the rotated file name is taken; move it aside"
            );
            self.rotate_not_before = now + ROTATE_RETRY;
            return;
        }
        if let Err(e) =
            std::fs::rename(&self.opts.path, &target).and_then(|()| fsync_parent(&target))
        {
            tracing::warn!(path = %self.opts.path.display(), "audit log not rotated: {e}");
            self.rotate_not_before = now + ROTATE_RETRY;
            return;
        }
        if let Err(e) = self.reopen() {
            // The old file is already renamed; nothing is written until a new one opens.
            self.needs_reopen = true;
            self.fail(&std::io::Error::other(format!(
                "cannot create a new audit log after rotating to {}: {e}",
                target.display()
            )));
            return;
        }
        self.prune();
    }

    /// Removes the oldest rotated files while they hold more than `max_bytes`, never the
    /// newest (the chain's link to the live file), and records what went.
    fn prune(&mut self) {
        if self.opts.max_bytes == 0 {
            return;
        }
        let files = match recover::rotated_files(&self.opts.path) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(path = %self.opts.path.display(), "cannot list rotated audit files: {e}");
                return;
            }
        };
        let sized: Vec<(std::path::PathBuf, u64)> = files
            .into_iter()
            .map(|f| {
                let len = std::fs::metadata(&f).map_or(0, |m| m.len());
                (f, len)
            })
            .collect();
        let mut total: u64 = sized.iter().map(|(_, len)| len).sum();
        let keep_last = sized.len().saturating_sub(1);
        let mut removed = Vec::new();
        let mut freed = 0u64;
        for (file, len) in sized.into_iter().take(keep_last) {
            if total <= self.opts.max_bytes {
                break;
            }
            match std::fs::remove_file(&file) {
                Ok(()) => {
                    total -= len;
                    freed += len;
                    removed.push(file);
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), "cannot remove an old audit file: {e}");
                    break;
                }
            }
        }
        if removed.is_empty() {
            return;
        }
        let _ = fsync_parent(&self.opts.path);
        let names: Vec<String> = removed.iter().map(|f| f.display().to_string()).collect();
        let reason = format!(
            "removed {} rotated file(s), {freed} bytes, to keep the rotated files within \
             audit_max_bytes ({} bytes): {}; the log now starts later, so verify it with \
             --partial",
            removed.len(),
            self.opts.max_bytes,
            names.join(", ")
        );
        tracing::warn!("audit log: {reason}");
        self.write_event(
            AuditEvent::new(EventKind::Daemon)
                .action(Action::Pruned)
                .reason(reason),
            false,
        );
    }

    fn reopen(&mut self) -> Result<(), AuditError> {
        let file = recover::open_locked(&self.opts.path)?;
        fsync_parent(&self.opts.path).map_err(|source| AuditError::Open {
            path: self.opts.path.clone(),
            source,
        })?;
        self.file = file;
        self.file_len = 0;
        self.file_first_seq = None;
        self.needs_truncate = false;
        self.needs_reopen = false;
        self.needs_sync = false;
        Ok(())
    }

    /// Whether the open file is still the one at the path. A deleted live file (link count 0,
    /// or nothing at the path) or one replaced by another file would otherwise take records
    /// that nobody can read: writes stop (strict mode denies) until the file is recreated.
    fn check_live(&mut self) {
        if self.needs_restore.is_some() || self.needs_reopen {
            return;
        }
        let Some(gone) = self.gone() else { return };
        tracing::error!(
            path = %self.opts.path.display(),
            "audit log: the live file was {}; recreating it from the open file",
            gone.as_str()
        );
        // Everything rendered so far goes into the old file first, so the copy holds it.
        if let Err(e) = self.commit() {
            self.fail(&e);
        }
        self.needs_restore = Some(gone);
        if let Err(e) = self.restore(gone) {
            self.fail(&e);
        }
    }

    fn gone(&self) -> Option<Gone> {
        use std::{io::ErrorKind, os::unix::fs::MetadataExt as _};
        let ours = self.file.metadata().ok()?;
        if !ours.is_file() {
            return None; // a test's /dev/full, a FIFO: nothing to restore
        }
        match std::fs::symlink_metadata(&self.opts.path) {
            // Unlinked, or moved away (renamed out of the path, or its directory was).
            Err(_) if ours.nlink() == 0 => Some(Gone::Deleted),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                Some(Gone::Deleted)
            }
            // Cannot look (a permission change on the directory): the next write will tell.
            Err(_) => None,
            Ok(at_path) if (at_path.dev(), at_path.ino()) != (ours.dev(), ours.ino()) => {
                Some(Gone::Replaced)
            }
            Ok(_) if ours.nlink() == 0 => Some(Gone::Deleted),
            Ok(_) => None,
        }
    }

    /// Recreates the live file at its path with the open file's records, moving a
    /// replacement aside as evidence, then records what happened and checkpoints.
    fn restore(&mut self, gone: Gone) -> std::io::Result<()> {
        let mut moved = None;
        // Whatever is at the path now (a replacement, or a file created since the deletion
        // was seen) is not ours: it is kept aside, never adopted.
        if std::fs::symlink_metadata(&self.opts.path).is_ok() {
            let mut name = self.opts.path.as_os_str().to_owned();
            name.push(format!(
                "-replaced-{}",
                jiff::Timestamp::now().as_millisecond()
            ));
            let aside = std::path::PathBuf::from(name);
            std::fs::rename(&self.opts.path, &aside)?;
            moved = Some(aside);
        }
        let new = recover::open_locked(&self.opts.path).map_err(std::io::Error::other)?;
        if new.metadata()?.len() > 0 {
            return Err(std::io::Error::other(
                "a new file appeared at the path while the old one was restored",
            ));
        }
        let mut copied = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut out = &new;
        while copied < self.file_len {
            let want = usize::try_from((self.file_len - copied).min(buf.len() as u64))
                .expect("bounded by the buffer");
            use std::os::unix::fs::FileExt as _;
            self.file.read_exact_at(&mut buf[..want], copied)?;
            out.write_all(&buf[..want])?;
            copied += want as u64;
        }
        new.sync_all()?;
        fsync_parent(&self.opts.path)?;
        self.file = new;
        self.needs_truncate = false;
        self.needs_sync = false;
        self.needs_restore = None;
        let mut reason = format!(
            "the live file {} was {} while the daemon was writing it; it was recreated with the \
             {copied} bytes of records the daemon still had open",
            self.opts.path.display(),
            gone.as_str()
        );
        if let Some(aside) = moved {
            let _ = write!(
                reason,
                "; the file found at the path was moved to {}",
                aside.display()
            );
        }
        tracing::warn!("audit log: {reason}");
        self.write_event(
            AuditEvent::new(EventKind::Daemon)
                .action(Action::Reopened)
                .reason(reason),
            false,
        );
        self.checkpoint()
    }

    fn failing(&self) -> bool {
        self.failing_since.is_some()
    }

    fn failing_error(&self) -> AuditError {
        AuditError::Failing {
            reason: self
                .failing_since
                .as_ref()
                .map(|f| f.error.clone())
                .unwrap_or_default(),
        }
    }

    fn fail(&mut self, err: &std::io::Error) {
        let message = format!("{}: {err}", self.opts.path.display());
        if self.failing_since.is_none() {
            tracing::error!("audit log writes failing: {message}; records are refused");
            self.failing_since = Some(Failure {
                since: Instant::now(),
                error: message.clone(),
                refused_before: self.shared.refused.load(Ordering::Relaxed),
                lost_before: self.lost,
            });
        }
        *self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = message;
        self.shared.failing.store(true, Ordering::Release);
        self.next_retry = Instant::now() + RETRY_INTERVAL;
    }

    /// Tries to write again: cut the file back, fsync, write what was kept, then a `resumed`
    /// record, and checkpoint. Stays failing at the first error.
    fn retry_now(&mut self) {
        self.next_retry = Instant::now() + RETRY_INTERVAL;
        let Some(failure) = self.failing_since.clone() else {
            return;
        };
        let result = (|| -> std::io::Result<()> {
            if let Some(gone) = self.needs_restore {
                self.restore(gone)?;
            }
            if self.needs_reopen {
                self.reopen().map_err(std::io::Error::other)?;
            }
            if self.needs_truncate {
                self.file.set_len(self.file_len)?;
                self.needs_truncate = false;
            }
            self.sync()?;
            // If the write below fails, the events go back to the retry.
            while let Some(event) = self.retry.pop_front() {
                self.write_event(event, true);
            }
            let refused = self.shared.refused.load(Ordering::Relaxed) - failure.refused_before;
            let reason = format!(
                "audit log writes failed for {:.1} s ({}); {refused} records were refused and \
                 {} lost meanwhile",
                failure.since.elapsed().as_secs_f64(),
                failure.error,
                self.lost - failure.lost_before,
            );
            self.write_event(
                AuditEvent::new(EventKind::Daemon)
                    .action(Action::Resumed)
                    .reason(reason),
                false,
            );
            self.checkpoint()
        })();
        match result {
            Ok(()) => {
                tracing::info!(path = %self.opts.path.display(), "audit log writes resumed");
                self.failing_since = None;
                self.shared.failing.store(false, Ordering::Release);
                self.maybe_rotate();
            }
            Err(e) => {
                *self
                    .shared
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    format!("{}: {e}", self.opts.path.display());
            }
        }
    }
}

impl Gone {
    fn as_str(self) -> &'static str {
        match self {
            Gone::Deleted => "deleted",
            Gone::Replaced => "replaced",
        }
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
