//! A server on loopback for the tests, and a small HTTP client.
#![allow(dead_code)]

use flux_api::keys::KeyConfig;
use flux_api::{Config, PipelineFactory, Server};
use flux_pipeline::Pipeline;
use flux_pipeline::image_io::{OutputFormat, encode_image, to_base64};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub const KEY: &str = "test-key";

/// A running server; dropping it shuts it down.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Asks for a graceful shutdown and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub fn demo_factory() -> PipelineFactory {
    flux_api::factory(Pipeline::demo)
}

/// Settings for a test server in `dir` with the one unlimited key [`KEY`].
pub fn config(dir: &Path) -> Config {
    let mut c = Config::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    c.keys = vec![KeyConfig::unlimited(KEY)];
    c
}

/// Starts a server with `config` on its own runtime thread.
pub fn start(config: Config) -> TestServer {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = match Server::start(config, demo_factory()).await {
                Ok(s) => s,
                Err(e) => {
                    addr_tx.send(Err(e.to_string())).unwrap();
                    return;
                }
            };
            addr_tx.send(Ok(server.addr)).unwrap();
            server
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap().expect("server starts");
    TestServer {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_mins(2)))
        .build()
        .into()
}

/// An answer: status, headers of interest, body bytes.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: String,
    pub credits: Option<String>,
    pub retry_after: Option<String>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            )
        })
    }

    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field in {}", self.json()))
            .to_string()
    }
}

fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut r = r.expect("request reaches the server");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header("content-type").unwrap_or_default();
    let credits = header("x-remaining-credits");
    let retry_after = header("retry-after");
    let body = r
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_vec()
        .expect("body");
    Answer {
        status: r.status().as_u16(),
        body,
        content_type,
        credits,
        retry_after,
    }
}

pub fn post(agent: &ureq::Agent, url: &str, key: Option<&str>, body: &[u8]) -> Answer {
    let mut req = agent.post(url).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    finish(req.send(body))
}

pub fn get(agent: &ureq::Agent, url: &str, key: Option<&str>) -> Answer {
    let mut req = agent.get(url);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    finish(req.call())
}

/// A small PNG (a gradient), `w x h`.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 9 % 256) as u8, (y * 5 % 256) as u8, 128])
    });
    encode_image(&img, OutputFormat::Png, &[]).unwrap()
}

/// A 16x16 PNG as base64.
pub fn small_image_b64() -> String {
    to_base64(&png(16, 16))
}

/// A valid, fast request body (16x16 image, 2 steps) with `extra` fields merged in.
pub fn body(extra: &Value) -> Vec<u8> {
    let mut v = serde_json::json!({
        "prompt": "a red fox",
        "image": small_image_b64(),
        "steps": 2,
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in e {
            o.insert(k.clone(), val.clone());
        }
    }
    serde_json::to_vec(&v).unwrap()
}

/// Polls the status URL until the job is COMPLETED or FAILED; returns the last status body.
pub fn wait_done(agent: &ureq::Agent, status_url: &str, key: Option<&str>) -> Value {
    for _ in 0..2400 {
        let a = get(agent, status_url, key);
        let v = a.json();
        match v["status"].as_str() {
            Some("COMPLETED" | "FAILED") => return v,
            Some("QUEUED" | "PROCESSING") => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("unexpected status {other:?} ({}): {v}", a.status),
        }
    }
    panic!("job did not finish in 120 s");
}
