//! Job claiming and completion through the PostgreSQL store with a zero-cost model: 4 workers
//! (tokio tasks, one store) claim and complete a batch of queued jobs until none is left.
//! Criterion reports jobs per second.
//!
//! Then submission latency with 2 API nodes (`Role::Api` servers on their own runtimes, one
//! store each) under 200 concurrent HTTP clients on loopback, each submitting in turn to
//! both nodes: HTTP request to durable QUEUED job, printed as median and p99. Twice: in a
//! closed loop (each client sends its next job as soon as the last is answered, so latency
//! is 200 / throughput) and in an open loop (the clients together offer a fixed 2,000
//! submissions per second, each latency counted from the job's scheduled send time).
//!
//! The server is a throw-away PostgreSQL on loopback with its default durability settings
//! (fsync on), or `FLUX_TEST_PG_URL`. Without PostgreSQL the bench prints a note and skips.

#[path = "../tests/postgres_support/mod.rs"]
mod postgres_support;

use criterion::{Criterion, Throughput, criterion_group};
use flux_api::JobParams;
use flux_api::keys::KeyConfig;
use flux_api::postgres::{PostgresOptions, PostgresStore};
use flux_api::store::{JobStore, NewJob, RunMetrics};
use flux_api::{Config, Role, Server, StoreChoice};
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

const CLIENTS: usize = 200;
const PER_CLIENT: usize = 10;
const KEY: &str = "bench-key";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Starts an API-only node on `url` on its own runtime thread; returns its address.
fn api_node(url: &str) -> std::net::SocketAddr {
    let mut cfg = Config::new(
        "127.0.0.1:0".parse().expect("address"),
        std::path::PathBuf::from("."),
    );
    cfg.store = StoreChoice::Postgres {
        url: url.to_string(),
        options: PostgresOptions {
            pool_size: 16,
            ..PostgresOptions::default()
        },
    };
    cfg.role = Role::Api;
    cfg.keys = vec![KeyConfig::unlimited(KEY)];
    cfg.max_queue = u64::MAX / 2;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let factory: flux_api::PipelineFactory =
                Arc::new(|| Err("an API node loads no model".to_string()));
            let server = Server::start(cfg, factory).await.expect("API node starts");
            tx.send(server.addr).expect("send address");
            server
                .run(std::future::pending())
                .await
                .expect("API node runs");
        });
    });
    rx.recv().expect("API node address")
}

/// Submissions of the open-loop run, in total per second.
const OPEN_RATE: f64 = 2000.0;
/// Submissions of each client in the open-loop run.
const OPEN_PER_CLIENT: usize = 20;

/// Runs `CLIENTS` client threads against `nodes`, each submitting `per_client` jobs, in turn
/// to each node. Closed loop (`rate` `None`): each sends its next job when the last is
/// answered. Open loop (`Some(total per second)`): client `c` sends job `i` at
/// `(c + i * CLIENTS) / rate` seconds after the start, or as soon as it can when it is late,
/// and the latency counts from that scheduled time, so time spent queued behind a slow
/// answer is included. Returns the latencies in milliseconds and the seconds the run took.
fn run_clients(
    nodes: &[std::net::SocketAddr; 2],
    body: &str,
    per_client: usize,
    rate: Option<f64>,
) -> (Vec<f64>, f64) {
    let barrier = std::sync::Barrier::new(CLIENTS + 1);
    let start = std::sync::OnceLock::<Instant>::new();
    let lat = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (barrier, start) = (&barrier, &start);
                s.spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .build()
                        .into();
                    barrier.wait();
                    // The main thread sets `start` before the barrier opens.
                    let t0 = *start.get().expect("start time");
                    let mut out = Vec::with_capacity(per_client);
                    for i in 0..per_client {
                        let addr = nodes[(c + i) % 2];
                        let t = match rate {
                            None => Instant::now(),
                            Some(rate) => {
                                let at =
                                    t0 + Duration::from_secs_f64((c + i * CLIENTS) as f64 / rate);
                                if let Some(wait) = at.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(wait);
                                }
                                at
                            }
                        };
                        let r = agent
                            .post(format!("http://{addr}/v2/flux-img2img"))
                            .header("x-api-key", KEY)
                            .header("content-type", "application/json")
                            .send(body.as_bytes())
                            .expect("submit");
                        out.push(t.elapsed().as_secs_f64() * 1e3);
                        assert_eq!(r.status().as_u16(), 200, "submission answered");
                    }
                    out
                })
            })
            .collect();
        let _ = start.set(Instant::now());
        barrier.wait();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client"))
            .collect::<Vec<f64>>()
    });
    let secs = start.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
    (lat, secs)
}

fn print_latency(name: &str, mut lat: Vec<f64>, secs: f64) {
    lat.sort_by(f64::total_cmp);
    println!(
        "{name}: n={} median={:.3}ms p99={:.3}ms ({:.0} submissions/s)",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len() as f64 / secs
    );
}

fn submission_latency() {
    if !have_postgres() {
        return;
    }
    let server = postgres_support::PgServer::start_with(true);
    let nodes = [api_node(server.url()), api_node(server.url())];
    let png = {
        let img = image::RgbImage::from_fn(16, 16, |x, y| {
            image::Rgb([(x * 9) as u8, (y * 5) as u8, 128])
        });
        flux_pipeline::image_io::encode_image(&img, flux_pipeline::image_io::OutputFormat::Png, &[])
            .expect("png")
    };
    let body = serde_json::json!({
        "prompt": "bench",
        "image": flux_pipeline::image_io::to_base64(&png),
        "steps": 1,
    })
    .to_string();
    let (lat, secs) = run_clients(&nodes, &body, PER_CLIENT, None);
    print_latency(
        &format!("postgres/submit_2_api_nodes_{CLIENTS}_clients (closed loop, no think time)"),
        lat,
        secs,
    );
    let (lat, secs) = run_clients(&nodes, &body, OPEN_PER_CLIENT, Some(OPEN_RATE));
    print_latency(
        &format!(
            "postgres/submit_2_api_nodes_{CLIENTS}_clients_open_loop_{OPEN_RATE}_per_s (from the scheduled send time)"
        ),
        lat,
        secs,
    );
}

criterion_group!(benches, claim_complete);

fn main() {
    benches();
    submission_latency();
    Criterion::default().configure_from_args().final_summary();
}
