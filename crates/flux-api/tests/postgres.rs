//! The PostgreSQL job store against a real server on loopback (see `postgres_support`).
//!
//! Without PostgreSQL these tests are ignored ("skipped: no PostgreSQL"); under CI they run
//! and a missing server fails them.

mod postgres_support;

use flux_api::JobParams;
use flux_api::postgres::{PostgresOptions, PostgresStore};
use flux_api::store::{JobStatus, JobStore, NewJob, RunMetrics, StateCounts, StoreError};
use postgres_support::PgServer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn params(steps: u64) -> JobParams {
    JobParams {
        prompt: "a lighthouse at dusk".into(),
        steps,
        seed: 42,
        denoise: 0.75,
        scheduler: "simple".into(),
        sampler_name: "euler".into(),
        base64: false,
        image_format: "png".into(),
    }
}

fn job(id: &str, key: Option<&str>) -> NewJob {
    NewJob {
        id: id.to_string(),
        key: key.map(str::to_string),
        params: params(4),
        image: format!("input of {id}").into_bytes(),
        created_at: 1_700_000_000.0,
    }
}

fn metrics() -> RunMetrics {
    RunMetrics {
        inference_time: 0.25,
        demo: true,
    }
}

fn options(lease_ms: u64, max_attempts: u64) -> PostgresOptions {
    PostgresOptions {
        pool_size: 8,
        lease: Duration::from_millis(lease_ms),
        max_attempts,
        ..PostgresOptions::default()
    }
}

async fn store(server: &PgServer, opts: PostgresOptions) -> PostgresStore {
    PostgresStore::connect_with(server.url(), opts)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", server.url(), server.log()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn store_semantics_match_the_embedded_store() {
    let server = PgServer::start();
    let s = store(&server, PostgresOptions::default()).await;

    assert_eq!(s.counts().await.unwrap(), StateCounts::default());
    assert!(s.get("nope").await.unwrap().is_none());
    assert!(s.claim_next().await.unwrap().is_none());

    for id in ["a", "b", "c"] {
        s.submit(job(id, Some("key-1")), 10).await.unwrap();
    }
    // Queue limit: 3 waiting, limit 3.
    match s.submit(job("d", None), 3).await {
        Err(StoreError::QueueFull(3)) => {}
        other => panic!("expected QueueFull(3), got {other:?}"),
    }
    // The same id twice is refused.
    assert!(s.submit(job("a", None), 10).await.is_err());

    let a = s.get("a").await.unwrap().expect("job a");
    assert_eq!(a.status, JobStatus::Queued);
    assert_eq!(a.key.as_deref(), Some("key-1"));
    assert_eq!(a.params.prompt, "a lighthouse at dusk");
    assert_eq!(a.params.steps, 4);
    assert_eq!(a.created_at, 1_700_000_000.0);
    assert_eq!(a.attempts, 0);
    assert_eq!(
        s.input("a").await.unwrap().as_deref(),
        Some(&b"input of a"[..])
    );
    assert!(s.output("a").await.unwrap().is_none());
    assert_eq!(
        s.counts().await.unwrap(),
        StateCounts {
            queued: 3,
            ..StateCounts::default()
        }
    );

    // Oldest first.
    let (ja, ca) = s.claim_next().await.unwrap().expect("claim a");
    assert_eq!(ja.id, "a");
    assert_eq!(ja.status, JobStatus::Processing);
    assert_eq!(ja.attempts, 1);
    assert!(ja.started_at.is_some());
    s.progress("a", &ca, 2, 4).await.unwrap();
    let a = s.get("a").await.unwrap().unwrap();
    assert_eq!((a.step, a.total_steps), (2, 4));
    // Progress under a wrong claim changes nothing.
    s.progress("a", "not-the-claim", 3, 4).await.unwrap();
    assert_eq!(s.get("a").await.unwrap().unwrap().step, 2);

    assert!(
        !s.complete("a", "wrong", b"x".to_vec(), metrics())
            .await
            .unwrap()
    );
    assert!(
        s.complete("a", &ca, b"output a".to_vec(), metrics())
            .await
            .unwrap()
    );
    // Never twice.
    assert!(
        !s.complete("a", &ca, b"again".to_vec(), metrics())
            .await
            .unwrap()
    );
    assert!(!s.fail("a", &ca, "late").await.unwrap());
    assert!(!s.requeue("a", &ca).await.unwrap());
    let a = s.get("a").await.unwrap().unwrap();
    assert_eq!(a.status, JobStatus::Completed);
    assert_eq!((a.step, a.total_steps), (4, 4));
    assert_eq!(a.inference_time, Some(0.25));
    assert!(a.demo);
    assert!(a.finished_at.is_some());
    assert_eq!(
        s.output("a").await.unwrap().as_deref(),
        Some(&b"output a"[..])
    );

    let (jb, cb) = s.claim_next().await.unwrap().expect("claim b");
    assert_eq!(jb.id, "b");
    assert!(s.fail("b", &cb, "decoder exploded").await.unwrap());
    assert!(
        !s.complete("b", &cb, b"x".to_vec(), metrics())
            .await
            .unwrap()
    );
    let b = s.get("b").await.unwrap().unwrap();
    assert_eq!(b.status, JobStatus::Failed);
    assert_eq!(b.error.as_deref(), Some("decoder exploded"));

    let (jc, cc) = s.claim_next().await.unwrap().expect("claim c");
    assert_eq!(jc.id, "c");
    assert!(s.claim_next().await.unwrap().is_none());
    assert!(s.requeue("c", &cc).await.unwrap());
    assert!(!s.requeue("c", &cc).await.unwrap());
    assert!(
        !s.complete("c", &cc, b"x".to_vec(), metrics())
            .await
            .unwrap()
    );
    let c = s.get("c").await.unwrap().unwrap();
    assert_eq!(c.status, JobStatus::Queued);
    let (jc, cc2) = s.claim_next().await.unwrap().expect("claim c again");
    assert_eq!((jc.id.as_str(), jc.attempts), ("c", 2));
    assert_ne!(cc, cc2);
    assert_eq!(
        s.counts().await.unwrap(),
        StateCounts {
            queued: 0,
            processing: 1,
            completed: 1,
            failed: 1
        }
    );

    // Recovery at start-up leaves a live claim alone (it may belong to another node).
    assert_eq!(s.recover().await.unwrap(), 0);
    assert_eq!(
        s.get("c").await.unwrap().unwrap().status,
        JobStatus::Processing
    );

    // Purge: only finished jobs finished before the cut, with their images.
    assert_eq!(s.purge(0.0).await.unwrap(), 0);
    let far_future = 4_000_000_000.0;
    assert_eq!(s.purge(far_future).await.unwrap(), 2);
    assert!(s.get("a").await.unwrap().is_none());
    assert!(s.output("a").await.unwrap().is_none());
    assert!(s.input("a").await.unwrap().is_none());
    assert!(s.get("b").await.unwrap().is_none());
    assert!(s.get("c").await.unwrap().is_some());
    assert_eq!(
        s.input("c").await.unwrap().as_deref(),
        Some(&b"input of c"[..])
    );

    // Credits.
    assert_eq!(s.credits_left("k", 3).await.unwrap(), 3);
    assert_eq!(s.charge("k", 3).await.unwrap(), Some(2));
    assert_eq!(s.charge("k", 3).await.unwrap(), Some(1));
    assert_eq!(s.charge("k", 3).await.unwrap(), Some(0));
    assert_eq!(s.charge("k", 3).await.unwrap(), None);
    assert_eq!(s.credits_left("k", 3).await.unwrap(), 0);
    assert_eq!(s.credits_left("k", 5).await.unwrap(), 2);
    assert_eq!(s.charge("other", 0).await.unwrap(), None);
    assert_eq!(s.credits_left("other", 1).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn nodes_share_the_schema_and_credits() {
    let server = PgServer::start();
    // Three nodes start at once: the migrations run once, under their advisory lock.
    let (a, b, c) = tokio::join!(
        store(&server, PostgresOptions::default()),
        store(&server, PostgresOptions::default()),
        store(&server, PostgresOptions::default()),
    );
    a.submit(job("j1", Some("shared")), 10).await.unwrap();
    assert_eq!(
        b.get("j1").await.unwrap().unwrap().status,
        JobStatus::Queued
    );
    let (_, claim) = c.claim_next().await.unwrap().unwrap();
    assert!(
        a.complete("j1", &claim, b"out".to_vec(), metrics())
            .await
            .unwrap()
    );
    assert_eq!(b.output("j1").await.unwrap().as_deref(), Some(&b"out"[..]));

    // 60 charges from three nodes against a quota of 25: exactly 25 succeed.
    let stores = [Arc::new(a), Arc::new(b), Arc::new(c)];
    let mut tasks = Vec::new();
    for i in 0..60 {
        let s = Arc::clone(&stores[i % 3]);
        tasks.push(tokio::spawn(async move { s.charge("quota-key", 25).await }));
    }
    let mut granted = Vec::new();
    for t in tasks {
        if let Some(left) = t.await.unwrap().unwrap() {
            granted.push(left);
        }
    }
    granted.sort_unstable();
    assert_eq!(granted, (0..25).collect::<Vec<u64>>());
    assert_eq!(stores[1].credits_left("quota-key", 25).await.unwrap(), 0);

    let (client_task, client) = raw_client(server.url()).await;
    let version: i32 = client
        .query_one("SELECT MAX(version) FROM flux_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, PostgresStore::schema_version());
    let rows: i64 = client
        .query_one("SELECT COUNT(*) FROM flux_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, i64::from(PostgresStore::schema_version()));
    drop(client);
    client_task.abort();
}

async fn raw_client(url: &str) -> (tokio::task::JoinHandle<()>, tokio_postgres::Client) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("raw connection");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (task, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn purge_runs_on_one_node_at_a_time() {
    let server = PgServer::start();
    let s = store(&server, PostgresOptions::default()).await;
    s.submit(job("old", None), 10).await.unwrap();
    let (_, claim) = s.claim_next().await.unwrap().unwrap();
    assert!(s.fail("old", &claim, "boom").await.unwrap());

    // Another node holds the purge lock: this one skips.
    let (task, other) = raw_client(server.url()).await;
    other
        .execute("SELECT pg_advisory_lock($1)", &[&0x666c_7578_0003_i64])
        .await
        .unwrap();
    assert_eq!(s.purge(4_000_000_000.0).await.unwrap(), 0);
    assert!(s.get("old").await.unwrap().is_some());
    other
        .execute("SELECT pg_advisory_unlock($1)", &[&0x666c_7578_0003_i64])
        .await
        .unwrap();
    assert_eq!(s.purge(4_000_000_000.0).await.unwrap(), 1);
    assert!(s.get("old").await.unwrap().is_none());
    drop(other);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn concurrent_claimers_complete_every_job_exactly_once() {
    const JOBS: usize = 400;
    const WORKERS: usize = 4;
    let server = PgServer::start();
    let s = Arc::new(store(&server, options(30_000, 3)).await);
    for i in 0..JOBS {
        s.submit(job(&format!("job-{i:04}"), None), u64::MAX)
            .await
            .unwrap();
    }
    let done: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (s, done) = (Arc::clone(&s), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut mine = 0usize;
            while let Some((rec, claim)) = s.claim_next().await.unwrap() {
                assert_eq!(rec.status, JobStatus::Processing);
                // Every other job reports progress first, as a worker does.
                if mine.is_multiple_of(2) {
                    s.progress(&rec.id, &claim, 1, 4).await.unwrap();
                }
                let out = format!("worker {w} made {}", rec.id).into_bytes();
                if s.complete(&rec.id, &claim, out, metrics()).await.unwrap() {
                    *done.lock().unwrap().entry(rec.id.clone()).or_default() += 1;
                }
                // A second completion of the same claim is refused.
                assert!(
                    !s.complete(&rec.id, &claim, Vec::new(), metrics())
                        .await
                        .unwrap()
                );
                mine += 1;
            }
            mine
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.unwrap();
    }
    assert_eq!(claimed, JOBS, "each job is claimed once");
    {
        let done = done.lock().unwrap();
        assert_eq!(done.len(), JOBS);
        assert!(done.values().all(|&n| n == 1));
    }
    assert_eq!(
        s.counts().await.unwrap(),
        StateCounts {
            completed: JOBS as u64,
            ..StateCounts::default()
        }
    );
    for i in (0..JOBS).step_by(37) {
        let id = format!("job-{i:04}");
        let out = s.output(&id).await.unwrap().expect("output stored");
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with(&format!("made {id}")), "{text}");
        assert_eq!(s.get(&id).await.unwrap().unwrap().attempts, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn an_expired_lease_is_claimed_again_and_the_old_claim_is_void() {
    let server = PgServer::start();
    let s = store(&server, options(800, 3)).await;
    s.submit(job("lost", None), 10).await.unwrap();
    s.submit(job("alive", None), 10).await.unwrap();

    let (j1, dead_claim) = s.claim_next().await.unwrap().unwrap();
    assert_eq!((j1.id.as_str(), j1.attempts), ("lost", 1));
    let (j2, live_claim) = s.claim_next().await.unwrap().unwrap();
    assert_eq!(j2.id, "alive");

    // "alive" keeps heart-beating for three lease lengths; "lost" stops.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(s.heartbeat("alive", &live_claim).await.unwrap());
    }
    let (again, new_claim) = s.claim_next().await.unwrap().expect("the lost job again");
    assert_eq!(again.id, "lost");
    assert_eq!(again.attempts, 2);
    assert_ne!(new_claim, dead_claim);
    // Nothing else to claim: the live job kept its lease.
    assert!(s.claim_next().await.unwrap().is_none());
    assert_eq!(
        s.get("alive").await.unwrap().unwrap().status,
        JobStatus::Processing
    );

    // The old worker wakes up: its claim is void.
    assert!(!s.heartbeat("lost", &dead_claim).await.unwrap());
    assert!(
        !s.complete("lost", &dead_claim, b"stale".to_vec(), metrics())
            .await
            .unwrap()
    );
    assert!(!s.fail("lost", &dead_claim, "stale").await.unwrap());
    assert!(
        s.complete("lost", &new_claim, b"fresh".to_vec(), metrics())
            .await
            .unwrap()
    );
    assert_eq!(
        s.output("lost").await.unwrap().as_deref(),
        Some(&b"fresh"[..])
    );
    assert!(
        s.complete("alive", &live_claim, b"ok".to_vec(), metrics())
            .await
            .unwrap()
    );

    // Progress reports extend the lease too.
    s.submit(job("slow", None), 10).await.unwrap();
    let (_, claim) = s.claim_next().await.unwrap().unwrap();
    for step in 0..8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.progress("slow", &claim, step, 8).await.unwrap();
    }
    assert_eq!(s.reap_expired().await.unwrap(), 0);
    assert!(
        s.complete("slow", &claim, b"done".to_vec(), metrics())
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn a_job_fails_after_max_attempts_with_the_reason() {
    let server = PgServer::start();
    let s = store(&server, options(300, 2)).await;
    s.submit(job("doomed", None), 10).await.unwrap();

    let (j, first) = s.claim_next().await.unwrap().unwrap();
    assert_eq!(j.attempts, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (j, second) = s.claim_next().await.unwrap().expect("second attempt");
    assert_eq!((j.id.as_str(), j.attempts), ("doomed", 2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The second lease ran out too: no third run.
    assert_eq!(s.reap_expired().await.unwrap(), 1);
    assert!(s.claim_next().await.unwrap().is_none());
    let rec = s.get("doomed").await.unwrap().unwrap();
    assert_eq!(rec.status, JobStatus::Failed);
    assert_eq!(rec.attempts, 2);
    assert!(rec.finished_at.is_some());
    let reason = rec.error.expect("a failure reason");
    assert!(
        reason.contains("heartbeats") && reason.contains("attempt 2 of 2"),
        "{reason}"
    );
    for claim in [&first, &second] {
        assert!(
            !s.complete("doomed", claim, b"x".to_vec(), metrics())
                .await
                .unwrap()
        );
    }
    assert_eq!(
        s.counts().await.unwrap(),
        StateCounts {
            failed: 1,
            ..StateCounts::default()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn the_store_reconnects_after_a_database_restart() {
    const JOBS: usize = 20;
    let server = PgServer::start_local(false);
    let s = Arc::new(store(&server, options(30_000, 3)).await);
    for i in 0..JOBS {
        s.submit(job(&format!("r-{i:02}"), None), 100)
            .await
            .unwrap();
    }
    // Warm the pool so it holds connections that the restart breaks.
    let (first, claim) = s.claim_next().await.unwrap().unwrap();
    assert!(
        s.complete(&first.id, &claim, b"before".to_vec(), metrics())
            .await
            .unwrap()
    );

    server.stop();
    // A call made while the database is down waits for it and then succeeds.
    let pending = {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.claim_next().await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !pending.is_finished(),
        "the call should wait for the database"
    );
    server.start_again();
    let (second, claim) = pending
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("claim across the restart: {e}"))
        .expect("a queued job survived the restart");
    assert!(
        s.complete(&second.id, &claim, b"across".to_vec(), metrics())
            .await
            .unwrap()
    );

    // Every other job completes on the reconnected pool.
    let mut completed = 2;
    while let Some((rec, claim)) = s.claim_next().await.unwrap() {
        assert!(
            s.complete(&rec.id, &claim, b"after".to_vec(), metrics())
                .await
                .unwrap()
        );
        completed += 1;
    }
    assert_eq!(completed, JOBS);
    assert_eq!(s.counts().await.unwrap().completed, JOBS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn bad_urls_and_unreachable_servers_give_clear_errors() {
    let err = PostgresStore::connect("postgres://user@host:notaport/db")
        .await
        .expect_err("a bad port");
    assert!(err.to_string().contains("invalid PostgreSQL URL"), "{err}");

    // Nothing listens on this port: the error arrives after the retry window.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = PostgresOptions {
        retry_for: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        ..PostgresOptions::default()
    };
    let err = PostgresStore::connect_with(&format!("postgres://flux@127.0.0.1:{port}/x"), opts)
        .await
        .expect_err("nobody listens");
    assert!(err.to_string().contains("PostgreSQL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn rate_limits_hold_across_nodes() {
    let server = PgServer::start();
    let (a, b) = tokio::join!(
        store(&server, PostgresOptions::default()),
        store(&server, PostgresOptions::default()),
    );
    assert!(a.shared() && b.shared());
    // 0.01 per second: a burst of one, then nothing for 100 s, whichever node asks.
    assert_eq!(a.take_rate_token("slow", 0.01).await.unwrap(), Ok(()));
    let wait = b.take_rate_token("slow", 0.01).await.unwrap().unwrap_err();
    assert!((90..=100).contains(&wait), "retry after {wait} s");
    assert!(a.take_rate_token("slow", 0.01).await.unwrap().is_err());
    // 30 requests from both nodes at once against a bucket of 10 (refilling at 10 per
    // second: at most a few more tokens while they run).
    let stores = [Arc::new(a), Arc::new(b)];
    let mut tasks = Vec::new();
    for i in 0..30 {
        let s = Arc::clone(&stores[i % 2]);
        tasks.push(tokio::spawn(async move {
            s.take_rate_token("burst", 10.0).await
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        if t.await.unwrap().unwrap().is_ok() {
            allowed += 1;
        }
    }
    assert!((10..20).contains(&allowed), "{allowed} of 30 allowed");
    // Other keys have their own bucket; a bad rate is an error, not a pass.
    assert_eq!(
        stores[0].take_rate_token("other", 0.01).await.unwrap(),
        Ok(())
    );
    assert!(stores[1].take_rate_token("other", f64::NAN).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn nodes_hear_of_jobs_queued_and_finished_elsewhere() {
    let server = PgServer::start();
    let (a, b) = tokio::join!(
        store(&server, options(60_000, 3)),
        store(&server, options(60_000, 3)),
    );
    let changes = b.changes().expect("the PostgreSQL store has notices");
    let mut queued = changes.queued();
    let mut finished = changes.finished();
    // The listener's first connect asks waiters to look again (an empty id): skip those.
    let wait = Duration::from_secs(10);
    tokio::time::sleep(Duration::from_millis(300)).await;
    queued.borrow_and_update();
    while let Ok(id) = finished.try_recv() {
        assert!(id.is_empty(), "{id}");
    }
    a.submit(job("n1", None), 10).await.unwrap();
    tokio::time::timeout(wait, queued.changed())
        .await
        .expect("a notice of the submission")
        .unwrap();
    let (_, claim) = a.claim_next().await.unwrap().unwrap();
    assert!(a.heartbeat("n1", &claim).await.unwrap());
    assert!(
        a.complete("n1", &claim, b"out".to_vec(), metrics())
            .await
            .unwrap()
    );
    let id = tokio::time::timeout(wait, finished.recv())
        .await
        .expect("a notice of the completion")
        .unwrap();
    assert_eq!(id, "n1");
    assert_eq!(b.lease(), Some(Duration::from_mins(1)));
}
