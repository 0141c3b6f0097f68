//! [`SqliteStore`]: the embedded job store (one SQLite file, WAL journal, full sync).

use crate::request::JobParams;
use crate::store::{
    JobRecord, JobStatus, JobStore, NewJob, RunMetrics, StateCounts, StoreError, StoreFuture,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Backend(e.to_string())
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    key TEXT,
    params TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    inference_time REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    demo INTEGER NOT NULL DEFAULT 0,
    claim TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
CREATE TABLE IF NOT EXISTS blobs (
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, kind)
);
CREATE TABLE IF NOT EXISTS credits (
    key TEXT PRIMARY KEY,
    used INTEGER NOT NULL
);
";

const COLUMNS: &str = "id, status, key, params, created_at, started_at, finished_at, step, total, \
                       error, inference_time, attempts, demo";

/// Jobs in one SQLite database file. Writes go through one connection, reads through another
/// (WAL lets them run side by side); every call runs on tokio's blocking pool.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a job is on disk when submit returns, even if the machine loses power.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn record(row: &Row<'_>) -> rusqlite::Result<Result<JobRecord, StoreError>> {
    let id: String = row.get(0)?;
    let status: String = row.get(1)?;
    let params: String = row.get(3)?;
    let corrupt = |message: String| StoreError::Corrupt {
        id: id.clone(),
        message,
    };
    let Some(status) = JobStatus::from_name(&status) else {
        return Ok(Err(corrupt(format!("unknown status '{status}'"))));
    };
    let params: JobParams = match serde_json::from_str(&params) {
        Ok(p) => p,
        Err(e) => return Ok(Err(corrupt(format!("parameters: {e}")))),
    };
    Ok(Ok(JobRecord {
        id: id.clone(),
        status,
        key: row.get(2)?,
        params,
        created_at: row.get(4)?,
        started_at: row.get(5)?,
        finished_at: row.get(6)?,
        step: row.get(7)?,
        total_steps: row.get(8)?,
        error: row.get(9)?,
        inference_time: row.get(10)?,
        attempts: row.get(11)?,
        demo: row.get::<_, i64>(12)? != 0,
    }))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let writer = open(path)?;
        writer.execute_batch(SCHEMA)?;
        let reader = open(path)?;
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    fn run<T, F>(&self, write: bool, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = if write {
            Arc::clone(&self.writer)
        } else {
            Arc::clone(&self.reader)
        };
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut guard = conn
                    .lock()
                    .map_err(|_| StoreError::Backend("connection lock poisoned".into()))?;
                f(&mut guard)
            })
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
        })
    }

    fn blob(&self, id: &str, kind: &'static str) -> StoreFuture<'_, Option<Vec<u8>>> {
        let id = id.to_string();
        self.run(false, move |c| {
            Ok(c.query_row(
                "SELECT data FROM blobs WHERE job_id = ?1 AND kind = ?2",
                params![id, kind],
                |r| r.get(0),
            )
            .optional()?)
        })
    }
}

impl JobStore for SqliteStore {
    fn submit(&self, job: NewJob, max_queued: u64) -> StoreFuture<'_, ()> {
        self.run(true, move |c| {
            let params = serde_json::to_string(&job.params)
                .map_err(|e| StoreError::Backend(format!("parameters: {e}")))?;
            let tx = c.transaction()?;
            let queued: u64 = tx.query_row(
                "SELECT COUNT(*) FROM jobs WHERE status = 'QUEUED'",
                [],
                |r| r.get(0),
            )?;
            if queued >= max_queued {
                return Err(StoreError::QueueFull(queued));
            }
            tx.execute(
                "INSERT INTO jobs (id, status, key, params, created_at) VALUES (?1, 'QUEUED', ?2, ?3, ?4)",
                params![job.id, job.key, params, job.created_at],
            )?;
            tx.execute(
                "INSERT INTO blobs (job_id, kind, data) VALUES (?1, 'input', ?2)",
                params![job.id, job.image],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn get(&self, id: &str) -> StoreFuture<'_, Option<JobRecord>> {
        let id = id.to_string();
        self.run(false, move |c| {
            let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1");
            c.prepare_cached(&sql)?
                .query_row(params![id], record)
                .optional()?
                .transpose()
        })
    }

    fn input(&self, id: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        self.blob(id, "input")
    }

    fn output(&self, id: &str) -> StoreFuture<'_, Option<Vec<u8>>> {
        self.blob(id, "output")
    }

    fn claim_next(&self) -> StoreFuture<'_, Option<(JobRecord, String)>> {
        self.run(true, move |c| {
            let claim = uuid::Uuid::new_v4().to_string();
            let sql = format!(
                "UPDATE jobs SET status = 'PROCESSING', claim = ?1, started_at = ?2, \
                 attempts = attempts + 1, step = 0, total = 0 \
                 WHERE seq = (SELECT seq FROM jobs WHERE status = 'QUEUED' ORDER BY seq LIMIT 1) \
                 RETURNING {COLUMNS}"
            );
            let rec = c
                .prepare_cached(&sql)?
                .query_row(params![claim, now()], record)
                .optional()?
                .transpose()?;
            Ok(rec.map(|r| (r, claim)))
        })
    }

    fn progress(&self, id: &str, claim: &str, step: u64, total: u64) -> StoreFuture<'_, ()> {
        let (id, claim) = (id.to_string(), claim.to_string());
        self.run(true, move |c| {
            c.execute(
                "UPDATE jobs SET step = ?1, total = ?2 WHERE id = ?3 AND claim = ?4 AND status = 'PROCESSING'",
                params![step, total, id, claim],
            )?;
            Ok(())
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
        self.run(true, move |c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE jobs SET status = 'COMPLETED', finished_at = ?1, inference_time = ?2, \
                 demo = ?3, step = total, claim = NULL \
                 WHERE id = ?4 AND claim = ?5 AND status = 'PROCESSING'",
                params![now(), metrics.inference_time, metrics.demo, id, claim],
            )?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute(
                "INSERT OR REPLACE INTO blobs (job_id, kind, data) VALUES (?1, 'output', ?2)",
                params![id, output],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn fail(&self, id: &str, claim: &str, error: &str) -> StoreFuture<'_, bool> {
        let (id, claim, error) = (id.to_string(), claim.to_string(), error.to_string());
        self.run(true, move |c| {
            let n = c.execute(
                "UPDATE jobs SET status = 'FAILED', finished_at = ?1, error = ?2, claim = NULL \
                 WHERE id = ?3 AND claim = ?4 AND status = 'PROCESSING'",
                params![now(), error, id, claim],
            )?;
            Ok(n > 0)
        })
    }

    fn requeue(&self, id: &str, claim: &str) -> StoreFuture<'_, bool> {
        let (id, claim) = (id.to_string(), claim.to_string());
        self.run(true, move |c| {
            let n = c.execute(
                "UPDATE jobs SET status = 'QUEUED', claim = NULL, step = 0, total = 0 \
                 WHERE id = ?1 AND claim = ?2 AND status = 'PROCESSING'",
                params![id, claim],
            )?;
            Ok(n > 0)
        })
    }

    fn recover(&self) -> StoreFuture<'_, u64> {
        self.run(true, move |c| {
            let n = c.execute(
                "UPDATE jobs SET status = 'QUEUED', claim = NULL, step = 0, total = 0 \
                 WHERE status = 'PROCESSING'",
                [],
            )?;
            Ok(n as u64)
        })
    }

    fn purge(&self, before: f64) -> StoreFuture<'_, u64> {
        self.run(true, move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM blobs WHERE job_id IN (SELECT id FROM jobs \
                 WHERE status IN ('COMPLETED', 'FAILED') AND finished_at < ?1)",
                params![before],
            )?;
            let n = tx.execute(
                "DELETE FROM jobs WHERE status IN ('COMPLETED', 'FAILED') AND finished_at < ?1",
                params![before],
            )?;
            tx.commit()?;
            Ok(n as u64)
        })
    }

    fn counts(&self) -> StoreFuture<'_, StateCounts> {
        self.run(false, move |c| {
            let mut counts = StateCounts::default();
            let mut stmt = c.prepare_cached("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
            for row in rows {
                let (status, n) = row?;
                counts.set_named(&status, n);
            }
            Ok(counts)
        })
    }

    fn charge(&self, key: &str, quota: u64) -> StoreFuture<'_, Option<u64>> {
        let key = key.to_string();
        self.run(true, move |c| {
            let tx = c.transaction()?;
            let used: u64 = tx
                .query_row(
                    "SELECT used FROM credits WHERE key = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            if used >= quota {
                return Ok(None);
            }
            tx.execute(
                "INSERT INTO credits (key, used) VALUES (?1, 1) \
                 ON CONFLICT (key) DO UPDATE SET used = used + 1",
                params![key],
            )?;
            tx.commit()?;
            Ok(Some(quota - used - 1))
        })
    }

    fn credits_left(&self, key: &str, quota: u64) -> StoreFuture<'_, u64> {
        let key = key.to_string();
        self.run(false, move |c| {
            let used: u64 = c
                .query_row(
                    "SELECT used FROM credits WHERE key = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            Ok(quota.saturating_sub(used))
        })
    }
}
