//! [`JobStore`]: where jobs, their images and key credits live.
//!
//! The trait is backend-neutral and async: the embedded SQLite store ([`crate::sqlite`]) runs
//! its queries on tokio's blocking pool, and a networked database can implement the same
//! methods with an async driver. Workers (plain threads) drive the futures with
//! `Handle::block_on`.

use crate::request::JobParams;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future returned by store methods.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// An error of the job store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("job store: {0}")]
    Backend(String),
    /// Too many jobs are waiting.
    #[error("the queue is full ({0} jobs waiting)")]
    QueueFull(u64),
    /// Stored data could not be read back.
    #[error("job store: corrupt record {id}: {message}")]
    Corrupt { id: String, message: String },
}

/// The state of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker is running it.
    Processing,
    /// Done; the output is stored.
    Completed,
    /// Done with an error.
    Failed,
}

impl JobStatus {
    /// Every state.
    pub const ALL: [Self; 4] = [
        Self::Queued,
        Self::Processing,
        Self::Completed,
        Self::Failed,
    ];

    /// The API's name (`QUEUED`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Processing => "PROCESSING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
        }
    }

    /// The state named `s`.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A job to enqueue.
#[derive(Clone, Debug)]
pub struct NewJob {
    /// Unique id.
    pub id: String,
    /// The API key that submitted it (`None` without authentication).
    pub key: Option<String>,
    /// Parameters.
    pub params: JobParams,
    /// The encoded input image.
    pub image: Vec<u8>,
    /// Unix time of submission, seconds.
    pub created_at: f64,
}

/// A job as stored (without its images).
#[derive(Clone, Debug)]
pub struct JobRecord {
    /// Unique id.
    pub id: String,
    /// State.
    pub status: JobStatus,
    /// Submitting key.
    pub key: Option<String>,
    /// Parameters.
    pub params: JobParams,
    /// Unix time of submission.
    pub created_at: f64,
    /// Unix time the last run started.
    pub started_at: Option<f64>,
    /// Unix time it finished.
    pub finished_at: Option<f64>,
    /// Steps done in the current run.
    pub step: u64,
    /// Steps of the current run.
    pub total_steps: u64,
    /// Failure reason.
    pub error: Option<String>,
    /// Seconds of compute of the finished run.
    pub inference_time: Option<f64>,
    /// Runs started (more than one after a restart re-queued it).
    pub attempts: u64,
    /// Whether the demo model made the output.
    pub demo: bool,
}

/// A finished run's figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunMetrics {
    /// Seconds of compute.
    pub inference_time: f64,
    /// Whether the demo model ran it.
    pub demo: bool,
}

/// Jobs per state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// QUEUED.
    pub queued: u64,
    /// PROCESSING.
    pub processing: u64,
    /// COMPLETED.
    pub completed: u64,
    /// FAILED.
    pub failed: u64,
}

impl StateCounts {
    /// Records `n` jobs in the state named `status` (a name not of [`JobStatus`] is ignored).
    pub fn set_named(&mut self, status: &str, n: u64) {
        match JobStatus::from_name(status) {
            Some(JobStatus::Queued) => self.queued = n,
            Some(JobStatus::Processing) => self.processing = n,
            Some(JobStatus::Completed) => self.completed = n,
            Some(JobStatus::Failed) => self.failed = n,
            None => {}
        }
    }
}

/// Durable storage of jobs, images and credits.
///
/// State changes are conditional so that a job completes at most once: `claim_next` moves one
/// QUEUED job to PROCESSING under a fresh claim token, and `complete`/`fail`/`requeue` only act
/// while that token still holds.
pub trait JobStore: Send + Sync + 'static {
    /// Stores a QUEUED job with its input image, unless `max_queued` jobs already wait
    /// ([`StoreError::QueueFull`]). Durable when the future resolves.
    fn submit(&self, job: NewJob, max_queued: u64) -> StoreFuture<'_, ()>;
    /// The job `id`, if it exists.
    fn get(&self, id: &str) -> StoreFuture<'_, Option<JobRecord>>;
    /// The input image of `id`.
    fn input(&self, id: &str) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// The output image of a completed job.
    fn output(&self, id: &str) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// Moves the oldest QUEUED job to PROCESSING and returns it with its claim token.
    fn claim_next(&self) -> StoreFuture<'_, Option<(JobRecord, String)>>;
    /// Records progress of a claimed job.
    fn progress(&self, id: &str, claim: &str, step: u64, total: u64) -> StoreFuture<'_, ()>;
    /// Stores the output and marks the job COMPLETED; `false` if the claim no longer holds.
    fn complete(
        &self,
        id: &str,
        claim: &str,
        output: Vec<u8>,
        metrics: RunMetrics,
    ) -> StoreFuture<'_, bool>;
    /// Marks the job FAILED; `false` if the claim no longer holds.
    fn fail(&self, id: &str, claim: &str, error: &str) -> StoreFuture<'_, bool>;
    /// Puts a claimed job back to QUEUED (shutdown).
    fn requeue(&self, id: &str, claim: &str) -> StoreFuture<'_, bool>;
    /// Puts every PROCESSING job back to QUEUED (start-up after a crash); returns how many.
    fn recover(&self) -> StoreFuture<'_, u64>;
    /// Deletes finished jobs that finished before `before` (unix seconds); returns how many.
    fn purge(&self, before: f64) -> StoreFuture<'_, u64>;
    /// Jobs per state.
    fn counts(&self) -> StoreFuture<'_, StateCounts>;
    /// Takes one credit of `key`, whose quota is `quota`: the credits left after it, or `None`
    /// when none was left.
    fn charge(&self, key: &str, quota: u64) -> StoreFuture<'_, Option<u64>>;
    /// Credits left to `key`.
    fn credits_left(&self, key: &str, quota: u64) -> StoreFuture<'_, u64>;

    /// Extends the lease of a claimed job; `false` when the claim no longer holds (the job was
    /// claimed again or finished), so its worker should stop. A store without leases (one
    /// machine, where a crash is recovered at start-up) keeps the default: always `true`.
    fn heartbeat(&self, id: &str, claim: &str) -> StoreFuture<'_, bool> {
        let _ = (id, claim);
        Box::pin(async { Ok(true) })
    }

    /// How long a claim holds without a heartbeat; `None` when claims do not expire.
    fn lease(&self) -> Option<Duration> {
        None
    }

    /// Whether several nodes share this store. Rate limits are then kept in the store
    /// ([`JobStore::take_rate_token`]) and waits go through [`JobStore::changes`], since other
    /// processes submit and finish the jobs.
    fn shared(&self) -> bool {
        false
    }

    /// Takes one request token of `key` (a bucket refilled at `rate` per second, holding at
    /// most `max(rate, 1)`), across every node: `Err(seconds)` to wait while none is left. The
    /// default allows everything: single-node stores leave rate limits to the server's memory.
    fn take_rate_token(&self, key: &str, rate: f64) -> StoreFuture<'_, Result<(), u64>> {
        let _ = (key, rate);
        Box::pin(async { Ok(Ok(())) })
    }

    /// Notifications of jobs queued and finished by any node, where the store has them.
    fn changes(&self) -> Option<&Changes> {
        None
    }
}

/// Signals of a shared store: a counter bumped whenever a job may have been queued, and the
/// ids of jobs that finished (COMPLETED or FAILED). Both are hints: a listener that lost its
/// connection bumps the counter and cannot replay finished ids, so waiters also poll.
#[derive(Debug)]
pub struct Changes {
    queued: tokio::sync::watch::Sender<u64>,
    finished: tokio::sync::broadcast::Sender<String>,
}

impl Default for Changes {
    fn default() -> Self {
        Self {
            queued: tokio::sync::watch::Sender::new(0),
            finished: tokio::sync::broadcast::Sender::new(1024),
        }
    }
}

impl Changes {
    /// A receiver whose value changes when a job may have been queued.
    pub fn queued(&self) -> tokio::sync::watch::Receiver<u64> {
        self.queued.subscribe()
    }

    /// A receiver of finished job ids.
    pub fn finished(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.finished.subscribe()
    }

    /// A job may have been queued (also called after a reconnect, when notices may be lost).
    pub fn bump_queued(&self) {
        self.queued.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Job `id` finished.
    pub fn job_finished(&self, id: String) {
        let _ = self.finished.send(id);
    }

    /// Notices may have been missed (the listening connection was lost): every waiter should
    /// look at the store again. Finished-id receivers get an empty id.
    pub fn resync(&self) {
        self.bump_queued();
        let _ = self.finished.send(String::new());
    }
}
