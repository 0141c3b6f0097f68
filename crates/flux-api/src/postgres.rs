//! [`PostgresStore`]: the job store shared by many API nodes and workers (PostgreSQL).
//!
//! * One schema, created and upgraded by numbered migrations at start-up (under an advisory
//!   lock, so nodes starting together do not race).
//! * Claiming takes the oldest QUEUED job with `SELECT ... FOR UPDATE SKIP LOCKED`, so claimers
//!   never wait on each other and never take the same job.
//! * A claim carries a lease (database clock). [`JobStore::progress`] and
//!   [`PostgresStore::heartbeat`] extend it; a job whose lease ran out goes back to QUEUED, or
//!   to FAILED with the reason once it has used up its attempts. Completion and failure are
//!   conditional on the claim token, so a job is never completed twice.
//! * Input and output images live in the database (`bytea`); credits too, so quotas hold across
//!   nodes. The retention purge runs on one node at a time (advisory lock).
//! * Connections come from a pool; a lost connection (database restart, failover) is retried
//!   with back-off for a configurable time before the error reaches the caller.
//! * State changes send `NOTIFY` (`flux_queued` on submission and re-queue, `flux_done` with the
//!   id on completion and failure); one extra connection per store `LISTEN`s and feeds
//!   [`Changes`], which wakes idle workers and synchronous requests on any node.
//! * Per-key rate limits are token buckets in the database (`flux_rate`, refilled on the
//!   database clock), so a key's limit holds across all API nodes together.
//! * Submissions are group-committed: the requests waiting on a node at the same moment are
//!   inserted (jobs, input images and one `NOTIFY`) by one statement, so one transaction and
//!   one WAL flush serve them all; each request is answered after that commit. The queue
//!   limit is checked against a per-node queue depth, counted again when older than
//!   [`PostgresOptions::queue_depth_refresh`] (longer far below the limit) and exactly
//!   before any refusal (a soft limit: nodes see each other's submissions at the next
//!   count).

use crate::request::JobParams;
use crate::store::{
    Changes, JobRecord, JobStatus, JobStore, NewJob, RunMetrics, StateCounts, StoreError,
    StoreFuture,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls};

/// Advisory lock keys (one namespace: "flux" in the high bytes).
const LOCK_MIGRATE: i64 = 0x666c_7578_0001;
const LOCK_PURGE: i64 = 0x666c_7578_0003;

/// Notification channels.
const CHANNEL_QUEUED: &str = "flux_queued";
const CHANNEL_DONE: &str = "flux_done";

/// Schema migrations, applied in order; each runs once per database.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "
CREATE TABLE flux_jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('QUEUED', 'PROCESSING', 'COMPLETED', 'FAILED')),
    key TEXT,
    params TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    step BIGINT NOT NULL DEFAULT 0,
    total BIGINT NOT NULL DEFAULT 0,
    error TEXT,
    inference_time DOUBLE PRECISION,
    attempts BIGINT NOT NULL DEFAULT 0,
    demo BOOLEAN NOT NULL DEFAULT FALSE,
    claim TEXT,
    lease_until DOUBLE PRECISION
);
CREATE INDEX flux_jobs_queued ON flux_jobs (seq) WHERE status = 'QUEUED';
CREATE INDEX flux_jobs_lease ON flux_jobs (lease_until) WHERE status = 'PROCESSING';
CREATE INDEX flux_jobs_finished ON flux_jobs (finished_at) WHERE status IN ('COMPLETED', 'FAILED');
CREATE TABLE flux_blobs (
    job_id TEXT NOT NULL REFERENCES flux_jobs (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (job_id, kind)
);
CREATE TABLE flux_credits (
    key TEXT PRIMARY KEY,
    used BIGINT NOT NULL
);
",
    ),
    (
        2,
        "
CREATE TABLE flux_rate (
    key TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);
",
    ),
];

const COLUMNS: &str = "id, status, key, params, created_at, started_at, finished_at, step, total, \
                       error, inference_time, attempts, demo";

/// The database clock in unix seconds (leases use it, so node clocks need not agree).
const DB_NOW: &str = "EXTRACT(EPOCH FROM clock_timestamp())::float8";

/// Settings of a [`PostgresStore`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Most connections the pool opens.
    pub pool_size: usize,
    /// How long a claim holds without a heartbeat or progress report.
    pub lease: Duration,
    /// Runs a job may start; when the lease of the last one runs out the job FAILS.
    pub max_attempts: u64,
    /// How long a call keeps retrying while the database is unreachable.
    pub retry_for: Duration,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
    /// Most submissions one group commit inserts.
    pub submit_batch: usize,
    /// Group commits of one store in flight at once; submissions arriving meanwhile wait and
    /// go together into the next one.
    pub submit_flushes: usize,
    /// How old the node's count of queued jobs may be before a submission counts again, near
    /// the queue limit (from half of it); 20 times that further below. A refusal always
    /// counts first.
    pub queue_depth_refresh: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            lease: Duration::from_mins(1),
            max_attempts: 3,
            retry_for: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            submit_batch: 256,
            submit_flushes: 4,
            queue_depth_refresh: Duration::from_millis(5),
        }
    }
}

/// Jobs, images and credits in one PostgreSQL database, shared by any number of nodes.
pub struct PostgresStore {
    pool: Pool,
    options: PostgresOptions,
    /// Milliseconds after `epoch` of the last sweep for expired leases.
    last_reap_ms: AtomicU64,
    epoch: Instant,
    changes: Arc<Changes>,
    listener: tokio::task::JoinHandle<()>,
    /// Submissions waiting for the group commit.
    submissions: mpsc::UnboundedSender<Pending>,
    batcher: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
        self.batcher.abort();
    }
}

/// Keeps one connection `LISTEN`ing on the notification channels and forwards what arrives
/// to `changes`; reconnects with back-off, and after each (re)connect asks every waiter to
/// look at the database again, since notices sent meanwhile are lost.
async fn listen(config: tokio_postgres::Config, changes: Arc<Changes>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if let Ok((client, mut conn)) = config.connect(NoTls).await {
            let mut drive = std::pin::pin!(async {
                while let Some(Ok(msg)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    if let AsyncMessage::Notification(n) = msg {
                        if n.channel() == CHANNEL_DONE {
                            changes.job_finished(n.payload().to_string());
                        } else {
                            changes.bump_queued();
                        }
                    }
                }
            });
            let sql = format!("LISTEN {CHANNEL_QUEUED}; LISTEN {CHANNEL_DONE}");
            let subscribe = client.batch_execute(&sql);
            tokio::select! {
                r = subscribe => {
                    if r.is_ok() {
                        backoff = Duration::from_millis(50);
                        changes.resync();
                        drive.await;
                    }
                }
                () = &mut drive => {}
            }
            drop(client);
        }
        // The connection is gone: waiters fall back to polling until it is back.
        changes.resync();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why one try of a call failed.
enum Failure {
    Pool(PoolError),
    Db(tokio_postgres::Error),
    Store(StoreError),
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        Self::Pool(e)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

fn db_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // No SQL state: the connection broke (closed, or an I/O error such as a refused or
        // timed-out connect). Other errors without one (a parameter that does not convert,
        // a protocol error) would only fail again.
        None => {
            let io = |s: &(dyn std::error::Error + 'static)| s.is::<std::io::Error>();
            e.is_closed() || std::error::Error::source(e).is_some_and(io)
        }
        Some(code) => {
            let c = code.code();
            // 08: connection exceptions; 57P01..57P03: shutdown, crash, not accepting yet;
            // 40001/40P01: serialization failure, deadlock (safe to run again).
            c.starts_with("08")
                || c.starts_with("57P")
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
        }
    }
}

impl Failure {
    /// Whether trying again may succeed (the database or the connection was away).
    fn transient(&self) -> bool {
        match self {
            Self::Pool(PoolError::Backend(e)) | Self::Db(e) => db_transient(e),
            Self::Pool(PoolError::Timeout(_)) => true,
            Self::Pool(_) | Self::Store(_) => false,
        }
    }

    fn into_store(self) -> StoreError {
        match self {
            Self::Pool(e) => StoreError::Backend(format!("PostgreSQL connection: {e}")),
            Self::Db(e) => StoreError::Backend(format!("PostgreSQL: {}", db_message(&e))),
            Self::Store(e) => e,
        }
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Runs `$try` (an expression giving a future) until it succeeds, fails for good, or the
/// database stayed away longer than `retry_for`. `$attempt` counts the tries made before.
macro_rules! retrying {
    ($self:ident, |$attempt:ident| $try:expr) => {{
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut $attempt: u32 = 0;
        loop {
            match $try.await {
                Ok(v) => break Ok(v),
                Err(f) if f.transient() && started.elapsed() < $self.options.retry_for => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    $attempt += 1;
                }
                Err(f) => break Err(f),
            }
        }
    }};
}

/// Most bytes of input images one group commit carries (a batch holds at least one job).
const BATCH_BYTES: usize = 8 << 20;

/// One statement stores a whole batch: the jobs (an id already taken is skipped and reported
/// by its absence from `inserted`), the input images of the jobs inserted, and one
/// `flux_queued` notice. Run outside an explicit transaction it commits on its own, so the
/// batch is durable when the answer arrives.
const SUBMIT_BATCH: &str = "\
WITH input AS ( \
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::bytea[]) \
        AS u(id, key, params, created_at, data)), \
jobs AS ( \
    INSERT INTO flux_jobs (id, status, key, params, created_at) \
    SELECT id, 'QUEUED', key, params, created_at FROM input \
    ON CONFLICT (id) DO NOTHING \
    RETURNING id), \
blobs AS ( \
    INSERT INTO flux_blobs (job_id, kind, data) \
    SELECT input.id, 'input', input.data FROM input JOIN jobs ON jobs.id = input.id) \
SELECT ARRAY(SELECT id FROM jobs) AS inserted, \
    (SELECT pg_notify('flux_queued', '')::text WHERE EXISTS (SELECT 1 FROM jobs)) AS notified";

/// A submission waiting for the group commit.
struct Pending {
    job: NewJob,
    /// `job.params` as JSON.
    params: String,
    max_queued: u64,
    done: oneshot::Sender<Result<(), StoreError>>,
}

impl Pending {
    fn answer(self, result: Result<(), StoreError>) {
        // The submitter may have gone (its client disconnected); the job stays queued.
        let _ = self.done.send(result);
    }
}

/// This node's view of the queue length. It may count too many (jobs claimed since, or
/// the node's own jobs counted twice by a count that ran while they committed), which only
/// makes the next refusal count again; it counts too few only by the jobs other nodes
/// queued since the last count.
#[derive(Debug, Default)]
struct QueueDepth {
    /// QUEUED jobs at the last count, plus those this node queued or is queuing since.
    jobs: u64,
    /// Jobs of this node's batches admitted and not yet stored (counted in `jobs`).
    in_flight: u64,
    /// Jobs this node has stored so far.
    stored: u64,
    /// Exact counts taken so far (a periodic count that overlapped one is dropped).
    exact_counts: u64,
    /// When the count was taken; `None` before the first.
    counted: Option<Instant>,
}
/// The group commit of one store: batches of waiting submissions, each stored by one
/// statement ([`SUBMIT_BATCH`]).
struct Submitter {
    pool: Pool,
    options: PostgresOptions,
    depth: Mutex<QueueDepth>,
    /// Held shared by a batch from its admission until it is stored (or failed), and
    /// exclusively by an exact count, which thus sees none of this node's batches half done.
    gate: tokio::sync::RwLock<()>,
}

/// Takes the next batch off `waiting`: at most `max_jobs` jobs and [`BATCH_BYTES`] of images
/// (at least one job), never the same id twice (a repeated id waits for a later batch, where
/// it meets the row of the first).
fn take_batch(waiting: &mut VecDeque<Pending>, max_jobs: usize) -> Vec<Pending> {
    let mut batch: Vec<Pending> = Vec::new();
    let mut ids = HashSet::new();
    let mut bytes = 0usize;
    let mut later = Vec::new();
    while let Some(p) = waiting.pop_front() {
        let full = batch.len() >= max_jobs
            || (!batch.is_empty() && bytes + p.job.image.len() > BATCH_BYTES);
        if full {
            waiting.push_front(p);
            break;
        }
        if !ids.insert(p.job.id.clone()) {
            later.push(p);
            continue;
        }
        bytes += p.job.image.len();
        batch.push(p);
    }
    for p in later.into_iter().rev() {
        waiting.push_front(p);
    }
    batch
}

/// Collects submissions and hands them to group commits, at most `submit_flushes` in flight:
/// while those run, new submissions wait and form the next batch.
async fn run_batcher(submitter: Arc<Submitter>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let flushes = Arc::new(Semaphore::new(submitter.options.submit_flushes));
    let max_jobs = submitter.options.submit_batch;
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    loop {
        let Ok(permit) = Arc::clone(&flushes).acquire_owned().await else {
            return;
        };
        if waiting.is_empty() {
            match rx.recv().await {
                Some(p) => waiting.push_back(p),
                None => return,
            }
        }
        while waiting.len() < max_jobs {
            match rx.try_recv() {
                Ok(p) => waiting.push_back(p),
                Err(_) => break,
            }
        }
        let batch = take_batch(&mut waiting, max_jobs);
        let submitter = Arc::clone(&submitter);
        tokio::spawn(async move {
            submitter.flush(batch).await;
            drop(permit);
        });
    }
}

impl Submitter {
    fn depth(&self) -> std::sync::MutexGuard<'_, QueueDepth> {
        self.depth.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn count_queued_once(&self) -> Result<u64, Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT COUNT(*) FROM flux_jobs WHERE status = 'QUEUED'")
            .await?;
        let n: i64 = client.query_one(&stmt, &[]).await?.try_get(0)?;
        Ok(n.unsigned_abs())
    }

    /// The periodic count (other nodes' submissions, claims), taken without stopping this
    /// node's batches: those that were in flight or were stored while it ran are added on
    /// top, since the count may or may not have seen them (too many rather than too few).
    async fn recount_periodic(&self) -> Result<(), Failure> {
        let (stored, exact_counts) = {
            let d = self.depth();
            (d.stored, d.exact_counts)
        };
        let n = retrying!(self, |_attempt| self.count_queued_once())?;
        let mut d = self.depth();
        if d.exact_counts == exact_counts {
            d.jobs = n + d.in_flight + (d.stored - stored);
            d.counted = Some(Instant::now());
        }
        Ok(())
    }

    /// The count before a refusal: waits until none of this node's batches is in flight
    /// and counts, so the depth is exactly the QUEUED jobs at that moment.
    async fn recount_exact(&self) -> Result<(), Failure> {
        let _alone = self.gate.write().await;
        let n = retrying!(self, |_attempt| self.count_queued_once())?;
        let mut d = self.depth();
        d.jobs = n + d.in_flight;
        d.exact_counts += 1;
        d.counted = Some(Instant::now());
        Ok(())
    }

    /// Whether `depth` would refuse a job of `batch`.
    fn would_refuse(depth: &QueueDepth, batch: &[Pending]) -> bool {
        let mut n = depth.jobs;
        batch.iter().any(|p| {
            let full = n >= p.max_queued;
            n += u64::from(!full);
            full
        })
    }

    /// Splits `batch` into the jobs the queue limit lets in (reserved in `depth`) and the
    /// refused ones with the queue length that refused them.
    fn admit(depth: &mut QueueDepth, batch: Vec<Pending>) -> (Vec<Pending>, Vec<(Pending, u64)>) {
        let (mut accepted, mut refused) = (Vec::new(), Vec::new());
        for p in batch {
            if depth.jobs >= p.max_queued {
                refused.push((p, depth.jobs));
            } else {
                depth.jobs += 1;
                depth.in_flight += 1;
                accepted.push(p);
            }
        }
        (accepted, refused)
    }

    /// Stores `batch` in one statement; per job, whether its row was inserted (`false`: the
    /// id was taken).
    async fn insert_once(&self, batch: &[Pending]) -> Result<Vec<bool>, Failure> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(SUBMIT_BATCH).await?;
        let ids: Vec<&str> = batch.iter().map(|p| p.job.id.as_str()).collect();
        let keys: Vec<Option<&str>> = batch.iter().map(|p| p.job.key.as_deref()).collect();
        let params: Vec<&str> = batch.iter().map(|p| p.params.as_str()).collect();
        let created: Vec<f64> = batch.iter().map(|p| p.job.created_at).collect();
        let images: Vec<&[u8]> = batch.iter().map(|p| p.job.image.as_slice()).collect();
        let row = client
            .query_one(&stmt, &[&ids, &keys, &params, &created, &images])
            .await?;
        let inserted: Vec<String> = row.try_get(0)?;
        let inserted: HashSet<&str> = inserted.iter().map(String::as_str).collect();
        Ok(ids.iter().map(|id| inserted.contains(id)).collect())
    }

    /// Stores `batch` (retrying while the database is away); per job, its answer. A job whose
    /// id is taken fails on the first try; on a retry it is taken to be the job's own row,
    /// committed by a try whose answer was lost.
    async fn insert(&self, batch: &[Pending]) -> Result<Vec<Result<(), StoreError>>, Failure> {
        let mut retried;
        let inserted = retrying!(self, |attempt| {
            retried = attempt > 0;
            self.insert_once(batch)
        })?;
        Ok(batch
            .iter()
            .zip(inserted)
            .map(|(p, ok)| {
                if ok || retried {
                    Ok(())
                } else {
                    Err(StoreError::Backend(format!(
                        "job id {} already exists",
                        p.job.id
                    )))
                }
            })
            .collect())
    }

    /// Admits, stores and answers one batch. The depth is counted when its count is older
    /// than `queue_depth_refresh` (20 times that while under half the limit), and exactly
    /// before any refusal.
    async fn flush(&self, batch: Vec<Pending>) {
        let stale = {
            let d = self.depth();
            // Far from the limit (under half of it) a fresh count matters less: count 20
            // times less often there, sparing the database a scan of a long queue.
            let limit = batch.iter().map(|p| p.max_queued).min().unwrap_or(u64::MAX);
            let refresh = if d.jobs.saturating_mul(2) >= limit {
                self.options.queue_depth_refresh
            } else {
                self.options.queue_depth_refresh * 20
            };
            d.counted.is_none_or(|t| t.elapsed() >= refresh)
        };
        let mut counted_exactly = false;
        let mut counting = if stale {
            self.recount_periodic().await
        } else {
            Ok(())
        };
        let (guard, accepted, refused) = loop {
            if let Err(f) = counting {
                let message = f.into_store().to_string();
                for p in batch {
                    p.answer(Err(StoreError::Backend(message.clone())));
                }
                return;
            }
            let guard = self.gate.read().await;
            if !counted_exactly && Self::would_refuse(&self.depth(), &batch) {
                drop(guard);
                counting = self.recount_exact().await;
                counted_exactly = true;
                continue;
            }
            let (accepted, refused) = Self::admit(&mut self.depth(), batch);
            break (guard, accepted, refused);
        };
        for (p, n) in refused {
            p.answer(Err(StoreError::QueueFull(n)));
        }
        if accepted.is_empty() {
            return;
        }
        let results = match self.insert(&accepted).await {
            Ok(results) => results,
            // A batch that fails for good (not for a lost connection) may fail because of one
            // job: store each on its own, so that only that one fails.
            Err(f) if accepted.len() > 1 && !f.transient() => {
                let mut results = Vec::with_capacity(accepted.len());
                for p in &accepted {
                    results.push(match self.insert(std::slice::from_ref(p)).await {
                        Ok(mut r) => r.pop().unwrap_or(Ok(())),
                        Err(f) => Err(f.into_store()),
                    });
                }
                results
            }
            Err(f) => {
                let message = f.into_store().to_string();
                accepted
                    .iter()
                    .map(|_| Err(StoreError::Backend(message.clone())))
                    .collect()
            }
        };
        {
            let mut d = self.depth();
            let stored = results.iter().filter(|r| r.is_ok()).count() as u64;
            let n = accepted.len() as u64;
            d.in_flight = d.in_flight.saturating_sub(n);
            d.jobs = d.jobs.saturating_sub(n - stored);
            d.stored += stored;
        }
        drop(guard);
        for (p, r) in accepted.into_iter().zip(results) {
            p.answer(r);
        }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(id: &str, what: &str, v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        id: id.to_string(),
        message: format!("{what} is negative ({v})"),
    })
}

fn record(row: &Row) -> Result<JobRecord, Failure> {
    let id: String = row.try_get(0)?;
    let status: String = row.try_get(1)?;
    let params: String = row.try_get(3)?;
    let corrupt = |message: String| StoreError::Corrupt {
        id: id.clone(),
        message,
    };
    let Some(status) = JobStatus::from_name(&status) else {
        return Err(corrupt(format!("unknown status '{status}'")).into());
    };
    let params: JobParams =
        serde_json::from_str(&params).map_err(|e| corrupt(format!("parameters: {e}")))?;
    Ok(JobRecord {
        status,
        key: row.try_get(2)?,
        params,
        created_at: row.try_get(4)?,
        started_at: row.try_get(5)?,
        finished_at: row.try_get(6)?,
        step: to_u64(&id, "step", row.try_get(7)?)?,
        total_steps: to_u64(&id, "total", row.try_get(8)?)?,
        error: row.try_get(9)?,
        inference_time: row.try_get(10)?,
        attempts: to_u64(&id, "attempts", row.try_get(11)?)?,
        demo: row.try_get(12)?,
        id,
    })
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db` or the
    /// `key=value` form) with default options and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects with `options` and runs the migrations.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Backend(format!(
                "invalid PostgreSQL URL (expected postgres://user@host:port/database): {e}"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("flux-api");
        }
        if options.pool_size == 0 {
            return Err(StoreError::Backend(
                "PostgreSQL pool size must be at least 1".into(),
            ));
        }
        if options.max_attempts == 0 {
            return Err(StoreError::Backend(
                "max attempts must be at least 1".into(),
            ));
        }
        if options.submit_batch == 0 || options.submit_flushes == 0 {
            return Err(StoreError::Backend(
                "submission batches and flushes must be at least 1".into(),
            ));
        }
        let changes = Arc::new(Changes::default());
        let listener = tokio::spawn(listen(config.clone(), Arc::clone(&changes)));
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.retry_for))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| StoreError::Backend(format!("PostgreSQL pool: {e}")))?;
        let submitter = Arc::new(Submitter {
            pool: pool.clone(),
            options: options.clone(),
            depth: Mutex::new(QueueDepth::default()),
            gate: tokio::sync::RwLock::new(()),
        });
        let (submissions, rx) = mpsc::unbounded_channel();
        let batcher = tokio::spawn(run_batcher(submitter, rx));
        let store = Self {
            pool,
            options,
            last_reap_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            changes,
            listener,
            submissions,
            batcher,
        };
        retrying!(store, |_attempt| store.migrate_once()).map_err(Failure::into_store)?;
        Ok(store)
    }

    /// The options in force.
    pub fn options(&self) -> &PostgresOptions {
        &self.options
    }

    /// The newest schema version this build knows.
    pub fn schema_version() -> i32 {
        MIGRATIONS.last().map_or(0, |m| m.0)
    }

    async fn migrate_once(&self) -> Result<(), Failure> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_MIGRATE])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS flux_schema_migrations (
                 version INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let current: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM flux_schema_migrations",
                &[],
            )
            .await?
            .try_get(0)?;
        let newest = Self::schema_version();
        if current > newest {
            return Err(StoreError::Backend(format!(
                "the database schema is version {current}, newer than this build knows ({newest}); \
                 upgrade this node"
            ))
            .into());
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO flux_schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Extends the lease of a claimed job; `false` if the claim no longer holds (the job was
    /// re-queued or finished), in which case the worker should stop working on it.
    pub async fn heartbeat(&self, id: &str, claim: &str) -> Result<bool, StoreError> {
        retrying!(self, |_attempt| self.heartbeat_once(id, claim)).map_err(Failure::into_store)
    }

    async fn heartbeat_once(&self, id: &str, claim: &str) -> Result<bool, Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE flux_jobs SET lease_until = {DB_NOW} + $3 \
                 WHERE id = $1 AND claim = $2 AND status = 'PROCESSING'"
            ))
            .await?;
        let n = client
            .execute(&stmt, &[&id, &claim, &self.options.lease.as_secs_f64()])
            .await?;
        Ok(n > 0)
    }

    /// Puts every job whose lease ran out back to QUEUED, or to FAILED once it has used up
    /// its attempts; returns how many jobs changed.
    pub async fn reap_expired(&self) -> Result<u64, StoreError> {
        retrying!(self, |_attempt| self.reap_once()).map_err(Failure::into_store)
    }

    async fn reap_once(&self) -> Result<u64, Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "WITH expired AS ( \
                     SELECT seq FROM flux_jobs \
                     WHERE status = 'PROCESSING' AND lease_until < {DB_NOW} \
                     FOR UPDATE SKIP LOCKED) \
                 UPDATE flux_jobs j SET \
                     status = CASE WHEN j.attempts >= $1::bigint THEN 'FAILED' ELSE 'QUEUED' END, \
                     error = CASE WHEN j.attempts >= $1::bigint THEN \
                         'the worker stopped sending heartbeats: the lease ran out on attempt ' \
                         || j.attempts || ' of ' || $1::bigint ELSE j.error END, \
                     finished_at = CASE WHEN j.attempts >= $1::bigint THEN $2::float8 ELSE j.finished_at END, \
                     claim = CASE WHEN j.attempts >= $1::bigint THEN j.claim END, \
                     lease_until = NULL, step = 0, total = 0 \
                 FROM expired e WHERE j.seq = e.seq \
                 RETURNING CASE WHEN j.status = 'FAILED' \
                     THEN pg_notify('{CHANNEL_DONE}', j.id) \
                     ELSE pg_notify('{CHANNEL_QUEUED}', '') END"
            ))
            .await?;
        let n = client
            .execute(&stmt, &[&to_i64(self.options.max_attempts), &unix_now()])
            .await?;
        self.last_reap_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        Ok(n)
    }

    /// Sweeps expired leases unless a sweep ran within the last tenth of a lease.
    async fn reap_if_due(&self) -> Result<(), Failure> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let every = (self.options.lease.as_millis() as u64 / 10).clamp(10, 5_000);
        let last = self.last_reap_ms.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= every {
            self.reap_once().await?;
        }
        Ok(())
    }

    async fn get_once(&self, id: &str) -> Result<Option<JobRecord>, Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!("SELECT {COLUMNS} FROM flux_jobs WHERE id = $1"))
            .await?;
        match client.query_opt(&stmt, &[&id]).await? {
            Some(row) => Ok(Some(record(&row)?)),
            None => Ok(None),
        }
    }

    async fn blob_once(&self, id: &str, kind: &str) -> Result<Option<Vec<u8>>, Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT data FROM flux_blobs WHERE job_id = $1 AND kind = $2")
            .await?;
        match client.query_opt(&stmt, &[&id, &kind]).await? {
            Some(row) => Ok(Some(row.try_get(0)?)),
            None => Ok(None),
        }
    }

    async fn claim_once(&self, claim: &str) -> Result<Option<JobRecord>, Failure> {
        self.reap_if_due().await?;
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE flux_jobs j SET status = 'PROCESSING', claim = $1, started_at = $2, \
                     attempts = j.attempts + 1, step = 0, total = 0, \
                     lease_until = {DB_NOW} + $3 \
                 FROM (SELECT seq FROM flux_jobs WHERE status = 'QUEUED' \
                       ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) next \
                 WHERE j.seq = next.seq \
                 RETURNING {COLUMNS}"
            ))
            .await?;
        let row = client
            .query_opt(
                &stmt,
                &[&claim, &unix_now(), &self.options.lease.as_secs_f64()],
            )
            .await?;
        match row {
            Some(row) => Ok(Some(record(&row)?)),
            None => Ok(None),
        }
    }

    async fn progress_once(
        &self,
        id: &str,
        claim: &str,
        step: u64,
        total: u64,
    ) -> Result<(), Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE flux_jobs SET step = $3, total = $4, lease_until = {DB_NOW} + $5 \
                 WHERE id = $1 AND claim = $2 AND status = 'PROCESSING'"
            ))
            .await?;
        client
            .execute(
                &stmt,
                &[
                    &id,
                    &claim,
                    &to_i64(step),
                    &to_i64(total),
                    &self.options.lease.as_secs_f64(),
                ],
            )
            .await?;
        Ok(())
    }

    /// Whether `id` already finished in `status` under `claim` (a retried call whose first
    /// try committed before the connection broke).
    async fn finished_under(
        &self,
        id: &str,
        claim: &str,
        status: JobStatus,
    ) -> Result<bool, Failure> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT 1 FROM flux_jobs WHERE id = $1 AND claim = $2 AND status = $3",
                &[&id, &claim, &status.name()],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn complete_once(
        &self,
        id: &str,
        claim: &str,
        output: &[u8],
        metrics: RunMetrics,
        attempt: u32,
    ) -> Result<bool, Failure> {
        let client = self.pool.get().await?;
        // One statement: the state change and the output land together or not at all. The
        // claim stays on the row so that a retried call can tell it already succeeded.
        let stmt = client
            .prepare_cached(
                "WITH done AS ( \
                     UPDATE flux_jobs SET status = 'COMPLETED', finished_at = $3, \
                         inference_time = $4, demo = $5, step = total, lease_until = NULL \
                     WHERE id = $1 AND claim = $2 AND status = 'PROCESSING' \
                     RETURNING id, pg_notify('flux_done', id)::text AS notified) \
                 INSERT INTO flux_blobs (job_id, kind, data) \
                 SELECT id, 'output', $6 FROM done \
                 ON CONFLICT (job_id, kind) DO UPDATE SET data = EXCLUDED.data \
                 RETURNING job_id",
            )
            .await?;
        let n = client
            .execute(
                &stmt,
                &[
                    &id,
                    &claim,
                    &unix_now(),
                    &metrics.inference_time,
                    &metrics.demo,
                    &output,
                ],
            )
            .await?;
        if n > 0 {
            return Ok(true);
        }
        if attempt > 0 {
            return self.finished_under(id, claim, JobStatus::Completed).await;
        }
        Ok(false)
    }

    async fn fail_once(
        &self,
        id: &str,
        claim: &str,
        error: &str,
        attempt: u32,
    ) -> Result<bool, Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE flux_jobs SET status = 'FAILED', finished_at = $3, error = $4, \
                     lease_until = NULL \
                 WHERE id = $1 AND claim = $2 AND status = 'PROCESSING' \
                 RETURNING pg_notify('flux_done', id)",
            )
            .await?;
        let n = client
            .execute(&stmt, &[&id, &claim, &unix_now(), &error])
            .await?;
        if n > 0 {
            return Ok(true);
        }
        if attempt > 0 {
            return self.finished_under(id, claim, JobStatus::Failed).await;
        }
        Ok(false)
    }

    async fn requeue_once(&self, id: &str, claim: &str) -> Result<bool, Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE flux_jobs SET status = 'QUEUED', claim = NULL, lease_until = NULL, \
                     step = 0, total = 0 \
                 WHERE id = $1 AND claim = $2 AND status = 'PROCESSING' \
                 RETURNING pg_notify('flux_queued', '')",
            )
            .await?;
        Ok(client.execute(&stmt, &[&id, &claim]).await? > 0)
    }

    async fn purge_once(&self, before: f64) -> Result<u64, Failure> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let got: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&LOCK_PURGE])
            .await?
            .try_get(0)?;
        if !got {
            // Another node is purging right now.
            return Ok(0);
        }
        // Images go with their job (ON DELETE CASCADE).
        let n = tx
            .execute(
                "DELETE FROM flux_jobs WHERE status IN ('COMPLETED', 'FAILED') AND finished_at < $1",
                &[&before],
            )
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn counts_once(&self) -> Result<StateCounts, Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT status, COUNT(*) FROM flux_jobs GROUP BY status")
            .await?;
        let mut counts = StateCounts::default();
        for row in client.query(&stmt, &[]).await? {
            let status: String = row.try_get(0)?;
            let n = to_u64("(counts)", "count", row.try_get(1)?)?;
            counts.set_named(&status, n);
        }
        Ok(counts)
    }

    async fn charge_once(&self, key: &str, quota: u64) -> Result<Option<u64>, Failure> {
        if quota == 0 {
            return Ok(None);
        }
        let client = self.pool.get().await?;
        // One statement: concurrent charges on any node never overdraw the quota.
        let stmt = client
            .prepare_cached(
                "INSERT INTO flux_credits (key, used) VALUES ($1, 1) \
                 ON CONFLICT (key) DO UPDATE SET used = flux_credits.used + 1 \
                 WHERE flux_credits.used < $2 \
                 RETURNING used",
            )
            .await?;
        let row = client.query_opt(&stmt, &[&key, &to_i64(quota)]).await?;
        match row {
            Some(row) => {
                let used = to_u64(key, "credits used", row.try_get(0)?)?;
                Ok(Some(quota.saturating_sub(used)))
            }
            None => Ok(None),
        }
    }

    async fn rate_once(&self, key: &str, rate: f64) -> Result<Result<(), u64>, Failure> {
        let burst = rate.max(1.0);
        let client = self.pool.get().await?;
        // One statement refills the bucket on the database clock and takes a token only when
        // one is there, so API nodes never race each other for the same key.
        let take = client
            .prepare_cached(&format!(
                "INSERT INTO flux_rate AS r (key, tokens, updated) \
                 VALUES ($1::text, $3::float8 - 1, {DB_NOW}) \
                 ON CONFLICT (key) DO UPDATE SET \
                     tokens = LEAST($3::float8, \
                         r.tokens + GREATEST({DB_NOW} - r.updated, 0) * $2::float8) - 1, \
                     updated = {DB_NOW} \
                 WHERE LEAST($3::float8, \
                     r.tokens + GREATEST({DB_NOW} - r.updated, 0) * $2::float8) >= 1 \
                 RETURNING r.tokens"
            ))
            .await?;
        if client
            .query_opt(&take, &[&key, &rate, &burst])
            .await?
            .is_some()
        {
            return Ok(Ok(()));
        }
        let level = client
            .prepare_cached(&format!(
                "SELECT LEAST($3::float8, tokens + GREATEST({DB_NOW} - updated, 0) * $2::float8) \
                 FROM flux_rate WHERE key = $1::text"
            ))
            .await?;
        let tokens: f64 = match client.query_opt(&level, &[&key, &rate, &burst]).await? {
            Some(row) => row.try_get(0)?,
            None => 0.0,
        };
        Ok(Err(((1.0 - tokens) / rate).ceil().max(1.0) as u64))
    }

    async fn credits_left_once(&self, key: &str, quota: u64) -> Result<u64, Failure> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT used FROM flux_credits WHERE key = $1")
            .await?;
        let used = match client.query_opt(&stmt, &[&key]).await? {
            Some(row) => to_u64(key, "credits used", row.try_get(0)?)?,
            None => 0,
        };
        Ok(quota.saturating_sub(used))
    }
}

impl JobStore for PostgresStore {
    fn submit(&self, job: NewJob, max_queued: u64) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let params = serde_json::to_string(&job.params)
                .map_err(|e| StoreError::Backend(format!("parameters: {e}")))?;
            let (done, answer) = oneshot::channel();
            let stopped = || StoreError::Backend("the submission batcher stopped".into());
            self.submissions
                .send(Pending {
                    job,
                    params,
                    max_queued,
                    done,
                })
                .map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        })
    }

    fn get(&self, id: &str) -> StoreFuture<'_, Option<JobRecord>> {
        let id = id.to_string();
        Box::pin(async move {
            retrying!(self, |_attempt| self.get_once(&id)).map_err(Failure::into_store)
        })
    }

    fn input(&self, id: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let id = id.to_string();
        Box::pin(async move {
            retrying!(self, |_attempt| self.blob_once(&id, "input")).map_err(Failure::into_store)
        })
    }

    fn output(&self, id: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let id = id.to_string();
        Box::pin(async move {
            retrying!(self, |_attempt| self.blob_once(&id, "output")).map_err(Failure::into_store)
        })
    }

    fn claim_next(&self) -> StoreFuture<'_, Option<(JobRecord, String)>> {
        Box::pin(async move {
            let claim = uuid::Uuid::new_v4().to_string();
            let rec =
                retrying!(self, |_attempt| self.claim_once(&claim)).map_err(Failure::into_store)?;
            Ok(rec.map(|r| (r, claim)))
        })
    }

    fn progress(&self, id: &str, claim: &str, step: u64, total: u64) -> StoreFuture<'_, ()> {
        let (id, claim) = (id.to_string(), claim.to_string());
        Box::pin(async move {
            retrying!(self, |_attempt| self
                .progress_once(&id, &claim, step, total))
            .map_err(Failure::into_store)
        })
    }

    fn complete(
        &self,
        id: &str,
        claim: &str,
        output: Vec<u8>,
        metrics: RunMetrics,
    ) -> StoreFuture<'_, bool> {
        let (id, claim) = (id.to_string(), claim.to_string());
        Box::pin(async move {
            retrying!(self, |attempt| self
                .complete_once(&id, &claim, &output, metrics, attempt))
            .map_err(Failure::into_store)
        })
    }

    fn fail(&self, id: &str, claim: &str, error: &str) -> StoreFuture<'_, bool> {
        let (id, claim, error) = (id.to_string(), claim.to_string(), error.to_string());
        Box::pin(async move {
            retrying!(self, |attempt| self.fail_once(&id, &claim, &error, attempt))
                .map_err(Failure::into_store)
        })
    }

    fn requeue(&self, id: &str, claim: &str) -> StoreFuture<'_, bool> {
        let (id, claim) = (id.to_string(), claim.to_string());
        Box::pin(async move {
            retrying!(self, |_attempt| self.requeue_once(&id, &claim)).map_err(Failure::into_store)
        })
    }

    /// With many nodes sharing the database, a PROCESSING job may belong to a live worker on
    /// another node, so start-up recovery only returns jobs whose lease ran out (see
    /// [`PostgresStore::reap_expired`]).
    fn recover(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.reap_expired())
    }

    fn purge(&self, before: f64) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            retrying!(self, |_attempt| self.purge_once(before)).map_err(Failure::into_store)
        })
    }

    fn counts(&self) -> StoreFuture<'_, StateCounts> {
        Box::pin(async move {
            retrying!(self, |_attempt| self.counts_once()).map_err(Failure::into_store)
        })
    }

    fn charge(&self, key: &str, quota: u64) -> StoreFuture<'_, Option<u64>> {
        let key = key.to_string();
        Box::pin(async move {
            retrying!(self, |_attempt| self.charge_once(&key, quota)).map_err(Failure::into_store)
        })
    }

    fn credits_left(&self, key: &str, quota: u64) -> StoreFuture<'_, u64> {
        let key = key.to_string();
        Box::pin(async move {
            retrying!(self, |_attempt| self.credits_left_once(&key, quota))
                .map_err(Failure::into_store)
        })
    }

    fn heartbeat(&self, id: &str, claim: &str) -> StoreFuture<'_, bool> {
        let (id, claim) = (id.to_string(), claim.to_string());
        Box::pin(async move { Self::heartbeat(self, &id, &claim).await })
    }

    fn lease(&self) -> Option<Duration> {
        Some(self.options.lease)
    }

    fn shared(&self) -> bool {
        true
    }

    fn take_rate_token(&self, key: &str, rate: f64) -> StoreFuture<'_, Result<(), u64>> {
        let key = key.to_string();
        Box::pin(async move {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(StoreError::Backend(format!(
                    "rate limit of key must be a positive number per second, not {rate}"
                )));
            }
            retrying!(self, |_attempt| self.rate_once(&key, rate)).map_err(Failure::into_store)
        })
    }

    fn changes(&self) -> Option<&Changes> {
        Some(self.changes.as_ref())
    }
}
