//! Job claiming and completion through the PostgreSQL store with a zero-cost model: 4 workers
//! (tokio tasks, one store) claim and complete a batch of queued jobs until none is left.
//! Criterion reports jobs per second.
//!
//! The server is a throw-away PostgreSQL on loopback with its default durability settings
//! (fsync on), or `FLUX_TEST_PG_URL`. Without PostgreSQL the bench prints a note and skips.

#[path = "../tests/postgres_support/mod.rs"]
mod postgres_support;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flux_api::JobParams;
use flux_api::postgres::{PostgresOptions, PostgresStore};
use flux_api::store::{JobStore, NewJob, RunMetrics};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BATCH: u64 = 400;
const WORKERS: usize = 4;

fn params() -> JobParams {
    JobParams {
        prompt: "bench".into(),
        steps: 1,
        seed: 0,
        denoise: 1.0,
        scheduler: "simple".into(),
        sampler_name: "euler".into(),
        base64: false,
        image_format: "png".into(),
    }
}

fn have_postgres() -> bool {
    std::env::var_os("FLUX_TEST_PG_URL").is_some()
        || std::env::var_os("FLUX_PG_BIN").is_some()
        || std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|mut d| d.next().is_some())
}

fn claim_complete(c: &mut Criterion) {
    if !have_postgres() {
        eprintln!("postgres bench skipped: no PostgreSQL");
        return;
    }
    let server = postgres_support::PgServer::start_with(true);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .expect("runtime");
    let store = Arc::new(
        rt.block_on(PostgresStore::connect_with(
            server.url(),
            PostgresOptions {
                pool_size: WORKERS * 2,
                ..PostgresOptions::default()
            },
        ))
        .expect("connect"),
    );
    let next_id = AtomicU64::new(0);
    let image = vec![7u8; 1024];
    let output = vec![9u8; 1024];

    let mut group = c.benchmark_group("postgres_store");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("claim_complete_4_workers", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Queue a batch (not timed).
                rt.block_on(async {
                    for _ in 0..BATCH {
                        let n = next_id.fetch_add(1, Ordering::Relaxed);
                        let job = NewJob {
                            id: format!("bench-{n}"),
                            key: None,
                            params: params(),
                            image: image.clone(),
                            created_at: 0.0,
                        };
                        store.submit(job, u64::MAX).await.expect("submit");
                    }
                });
                let start = Instant::now();
                let done = rt.block_on(async {
                    let mut tasks = Vec::new();
                    for _ in 0..WORKERS {
                        let (store, output) = (Arc::clone(&store), output.clone());
                        tasks.push(tokio::spawn(async move {
                            let mut n = 0u64;
                            while let Some((job, claim)) = store.claim_next().await.expect("claim")
                            {
                                let metrics = RunMetrics {
                                    inference_time: 0.0,
                                    demo: true,
                                };
                                if store
                                    .complete(&job.id, &claim, output.clone(), metrics)
                                    .await
                                    .expect("complete")
                                {
                                    n += 1;
                                }
                            }
                            n
                        }));
                    }
                    let mut n = 0;
                    for t in tasks {
                        n += t.await.expect("worker");
                    }
                    n
                });
                total += start.elapsed();
                assert_eq!(done, BATCH, "every job completed once");
                // Keep the table small between rounds (not timed).
                rt.block_on(store.purge(f64::MAX)).expect("purge");
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, claim_complete);
criterion_main!(benches);
