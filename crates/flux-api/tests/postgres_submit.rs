//! Group-committed submissions to the PostgreSQL store (see `postgres_support`): many
//! submissions at once, each stored with its own image, a repeated id, one bad job among
//! good ones, and the queue limit under concurrency on one node and across two.
//!
//! Without PostgreSQL these tests are ignored ("skipped: no PostgreSQL").

mod postgres_support;

use flux_api::JobParams;
use flux_api::postgres::{PostgresOptions, PostgresStore};
use flux_api::store::{JobStatus, JobStore, NewJob, StoreError};
use postgres_support::PgServer;
use std::sync::Arc;
use std::time::Duration;

fn job(id: &str, key: Option<String>, image: Vec<u8>, created_at: f64) -> NewJob {
    NewJob {
        id: id.to_string(),
        key,
        params: JobParams {
            prompt: format!("prompt of {id}"),
            steps: 3,
            seed: 7,
            denoise: 0.5,
            scheduler: "simple".into(),
            sampler_name: "euler".into(),
            base64: false,
            image_format: "png".into(),
        },
        image,
        created_at,
    }
}

async fn store(server: &PgServer, opts: PostgresOptions) -> Arc<PostgresStore> {
    Arc::new(
        PostgresStore::connect_with(server.url(), opts)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", server.url(), server.log())),
    )
}

/// Submits every job at once (one task each); the answers in the order given.
async fn submit_all(
    s: &Arc<PostgresStore>,
    jobs: Vec<NewJob>,
    max_queued: u64,
) -> Vec<Result<(), StoreError>> {
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|j| {
            let s = Arc::clone(s);
            tokio::spawn(async move { s.submit(j, max_queued).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("submission task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn concurrent_submissions_each_keep_their_own_image_and_key() {
    let server = PgServer::start();
    let s = store(&server, PostgresOptions::default()).await;
    const N: usize = 300;
    let key = |i: usize| (!i.is_multiple_of(5)).then(|| format!("key-{}", i % 3));
    let image = |i: usize| format!("image {i}").repeat(1 + i % 7).into_bytes();
    let mut jobs: Vec<NewJob> = (0..N)
        .map(|i| job(&format!("j{i}"), key(i), image(i), i as f64))
        .collect();
    // The same id twice in the same burst: one of them is stored, the other refused.
    jobs.insert(N / 2, job("dup", None, b"first".to_vec(), 0.5));
    jobs.push(job("dup", None, b"second".to_vec(), 0.5));
    let results = submit_all(&s, jobs, u64::MAX).await;

    let (dups, others): (Vec<_>, Vec<_>) = results
        .into_iter()
        .enumerate()
        .partition(|(i, _)| *i == N / 2 || *i == N + 1);
    for (i, r) in &others {
        assert!(r.is_ok(), "submission {i}: {r:?}");
    }
    let ok: Vec<bool> = dups.iter().map(|(_, r)| r.is_ok()).collect();
    assert_eq!(
        ok.iter().filter(|&&b| b).count(),
        1,
        "exactly one of two submissions of the same id is stored: {dups:?}"
    );
    let refused = dups
        .iter()
        .find_map(|(_, r)| r.as_ref().err())
        .expect("one refusal");
    assert!(refused.to_string().contains("already exists"), "{refused}");
    let stored = s.input("dup").await.unwrap().expect("input of dup");
    let winner = if ok[0] { &b"first"[..] } else { &b"second"[..] };
    assert_eq!(stored, winner);

    for i in 0..N {
        let id = format!("j{i}");
        let rec = s.get(&id).await.unwrap().unwrap_or_else(|| panic!("{id}"));
        assert_eq!(rec.status, JobStatus::Queued);
        assert_eq!(rec.key, key(i), "{id}");
        assert_eq!(rec.created_at, i as f64, "{id}");
        assert_eq!(rec.params.prompt, format!("prompt of {id}"));
        assert_eq!(s.input(&id).await.unwrap(), Some(image(i)), "{id}");
    }
    assert_eq!(s.counts().await.unwrap().queued, N as u64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn one_bad_job_fails_alone_among_good_ones() {
    let server = PgServer::start();
    let s = store(&server, PostgresOptions::default()).await;
    let mut jobs: Vec<NewJob> = (0..40)
        .map(|i| job(&format!("good-{i}"), None, vec![i as u8; 64], 1.0))
        .collect();
    // PostgreSQL text cannot hold a NUL character: this job fails on its own merits.
    jobs.insert(20, job("bad\0id", Some("k".into()), vec![1, 2, 3], 1.0));
    let results = submit_all(&s, jobs, u64::MAX).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_ok(), i != 20, "submission {i}: {r:?}");
    }
    for i in 0..40u8 {
        let id = format!("good-{i}");
        assert_eq!(s.input(&id).await.unwrap(), Some(vec![i; 64]), "{id}");
    }
    assert_eq!(s.counts().await.unwrap().queued, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
async fn the_queue_limit_holds_under_concurrent_submissions_and_frees_up_after_claims() {
    let server = PgServer::start();
    // Only the counts taken before refusals decide (no periodic count in this test).
    let opts = PostgresOptions {
        queue_depth_refresh: Duration::from_hours(1),
        ..PostgresOptions::default()
    };
    let s = store(&server, opts).await;
    const LIMIT: u64 = 25;
    let jobs: Vec<NewJob> = (0..60)
        .map(|i| job(&format!("q{i}"), None, vec![0; 16], f64::from(i)))
        .collect();
    let results = submit_all(&s, jobs, LIMIT).await;
    let stored = results.iter().filter(|r| r.is_ok()).count() as u64;
    assert_eq!(stored, LIMIT, "one node admits exactly up to the limit");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        match r {
            StoreError::QueueFull(n) => assert_eq!(*n, LIMIT),
            other => panic!("expected QueueFull, got {other:?}"),
        }
    }
    assert_eq!(s.counts().await.unwrap().queued, LIMIT);

    // Two jobs leave the queue: two more fit, the third does not.
    for _ in 0..2 {
        s.claim_next().await.unwrap().expect("a queued job");
    }
    s.submit(job("after-1", None, vec![1], 0.0), LIMIT)
        .await
        .unwrap();
    s.submit(job("after-2", None, vec![2], 0.0), LIMIT)
        .await
        .unwrap();
    match s.submit(job("after-3", None, vec![3], 0.0), LIMIT).await {
        Err(StoreError::QueueFull(n)) => assert_eq!(n, LIMIT),
        other => panic!("expected QueueFull({LIMIT}), got {other:?}"),
    }

    // Another node sees the same queue.
    let other = store(&server, PostgresOptions::default()).await;
    match other
        .submit(job("elsewhere", None, vec![4], 0.0), LIMIT)
        .await
    {
        Err(StoreError::QueueFull(n)) => assert_eq!(n, LIMIT),
        r => panic!("expected QueueFull({LIMIT}) on the other node, got {r:?}"),
    }
    assert!(
        other
            .submit(job("elsewhere", None, vec![4], 0.0), LIMIT + 1)
            .await
            .is_ok()
    );
    assert!(s.get("after-3").await.unwrap().is_none());
}
