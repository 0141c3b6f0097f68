//! Load bench of the job API on loopback (run with `cargo bench -p flux-api --bench api`):
//! status polls paced at 500 per second (p50/p99), and submissions from HTTP request to a
//! durable QUEUED job (median). Prints one line per figure.

use flux_api::keys::KeyConfig;
use flux_api::{Config, PipelineFactory, Server};
use flux_pipeline::Pipeline;
use flux_pipeline::image_io::{OutputFormat, encode_image, to_base64};
use std::time::{Duration, Instant};

const KEY: &str = "bench-key";
const POLL_RATE: f64 = 500.0;
const POLL_SECONDS: f64 = 5.0;
const SUBMISSIONS: usize = 200;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = Config::new(
        "127.0.0.1:0".parse().expect("address"),
        dir.path().to_path_buf(),
    );
    cfg.keys = vec![KeyConfig::unlimited(KEY)];
    cfg.max_queue = 100_000;
    let factory: PipelineFactory = flux_api::factory(Pipeline::demo);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let server = Server::start(cfg, factory).await.expect("server starts");
            addr_tx.send(server.addr).expect("send address");
            server
                .run(std::future::pending())
                .await
                .expect("server runs");
        });
    });
    let addr = addr_rx.recv().expect("server address");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 5, 128]));
    let png = encode_image(&img, OutputFormat::Png, &[]).expect("png");
    // Denoise 0: the worker does almost nothing, so the HTTP and store path is what is timed.
    let body = serde_json::json!({ "prompt": "bench", "image": to_base64(&png), "denoise": 0.0, "steps": 1 })
        .to_string();

    let mut submit = Vec::with_capacity(SUBMISSIONS);
    let mut ids = Vec::with_capacity(SUBMISSIONS);
    for _ in 0..SUBMISSIONS {
        let t = Instant::now();
        let mut r = agent
            .post(format!("http://{addr}/v2/flux-img2img"))
            .header("x-api-key", KEY)
            .header("content-type", "application/json")
            .send(body.as_bytes())
            .expect("submit");
        submit.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.status().as_u16(), 200);
        let v: serde_json::Value =
            serde_json::from_slice(&r.body_mut().read_to_vec().expect("body")).expect("json");
        ids.push(v["request_id"].as_str().expect("request_id").to_string());
    }
    submit.sort_by(f64::total_cmp);

    let n = (POLL_RATE * POLL_SECONDS) as usize;
    let mut polls = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / POLL_RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        let r = agent
            .get(format!(
                "http://{addr}/v2/requests/{}/status",
                ids[i % ids.len()]
            ))
            .header("x-api-key", KEY)
            .call()
            .expect("poll");
        polls.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.status().as_u16(), 200);
    }
    let achieved = n as f64 / start.elapsed().as_secs_f64();
    polls.sort_by(f64::total_cmp);
    println!(
        "api/submit_to_queued: n={} median={:.3}ms p99={:.3}ms",
        submit.len(),
        percentile(&submit, 0.5),
        percentile(&submit, 0.99)
    );
    println!(
        "api/status_poll at {achieved:.0}/s: n={} median={:.3}ms p99={:.3}ms",
        polls.len(),
        percentile(&polls, 0.5),
        percentile(&polls, 0.99)
    );
}
