//! Bounded load: 200 submissions and 5,000 status polls from 32 concurrent clients on
//! loopback. No errors allowed; latencies are printed, not asserted.

mod common;

use common::{KEY, agent, body, get, post};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn load_200_submissions_5000_polls_32_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.max_queue = 10_000;
    let server = common::start(cfg);
    let base = server.url("");
    let ids = Arc::new(Mutex::new(Vec::<String>::new()));
    let submit_ms = Arc::new(Mutex::new(Vec::<f64>::new()));
    let poll_ms = Arc::new(Mutex::new(Vec::<f64>::new()));
    // Denoise 0 keeps the jobs cheap: the queue and store are what is measured.
    let req = body(&json!({ "denoise": 0.0, "steps": 1 }));
    let clients: Vec<_> = (0..32)
        .map(|c| {
            let (base, ids, submit_ms, poll_ms, req) = (
                base.clone(),
                Arc::clone(&ids),
                Arc::clone(&submit_ms),
                Arc::clone(&poll_ms),
                req.clone(),
            );
            std::thread::spawn(move || {
                let a = agent();
                let submissions = 200 / 32 + usize::from(c < 200 % 32);
                for _ in 0..submissions {
                    let t = Instant::now();
                    let ans = post(&a, &format!("{base}/v2/flux-img2img"), Some(KEY), &req);
                    submit_ms
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
                    ids.lock()
                        .unwrap()
                        .push(ans.json()["request_id"].as_str().unwrap().to_string());
                }
                let polls = 5000 / 32 + usize::from(c < 5000 % 32);
                for i in 0..polls {
                    let id = {
                        let ids = ids.lock().unwrap();
                        ids[(i * 31 + c) % ids.len()].clone()
                    };
                    let t = Instant::now();
                    let ans = get(&a, &format!("{base}/v2/requests/{id}/status"), Some(KEY));
                    poll_ms
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    let mut s = submit_ms.lock().unwrap().clone();
    let mut p = poll_ms.lock().unwrap().clone();
    assert_eq!(s.len(), 200);
    assert_eq!(p.len(), 5000);
    s.sort_by(f64::total_cmp);
    p.sort_by(f64::total_cmp);
    println!(
        "submissions: n={} median={:.2}ms p99={:.2}ms; status polls: n={} median={:.2}ms p99={:.2}ms",
        s.len(),
        percentile(&s, 0.5),
        percentile(&s, 0.99),
        p.len(),
        percentile(&p, 0.5),
        percentile(&p, 0.99)
    );
    let a = agent();
    assert_eq!(get(&a, &server.url("/healthz"), None).status, 200);
}
