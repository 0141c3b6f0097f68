//! Submit jobs, SIGKILL the server, start it again on the same data dir: every job completes,
//! and exactly once (counted from the servers' own job log lines).

mod common;

use common::{KEY, agent, body, get, post};
use serde_json::json;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "FLUX_API_TEST_CHILD_DIR";

/// Not a test on its own: the server process the restart test starts and kills.
#[test]
#[ignore = "run by restart_after_sigkill_completes_every_job_once as its server process"]
fn child_server() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let server = common::start(common::config(std::path::Path::new(&dir)));
    println!("ADDR {}", server.addr);
    loop {
        std::thread::sleep(Duration::from_hours(1));
    }
}

// The child is killed and waited for by the test; a panic here ends the test anyway.
#[allow(clippy::zombie_processes)]
fn spawn(dir: &std::path::Path, log: &std::path::Path) -> (Child, String) {
    let stderr = std::fs::File::create(log).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_server", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("ADDR ") {
            return (child, addr.trim().to_string());
        }
    }
    panic!("the server process exited before listening");
}

#[test]
fn restart_after_sigkill_completes_every_job_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (log1, log2) = (dir.path().join("run1.log"), dir.path().join("run2.log"));
    let (mut child, addr) = spawn(&data, &log1);
    let a = agent();
    let img = flux_pipeline::image_io::to_base64(&common::png(32, 32));
    let mut ids = Vec::new();
    for seed in 0..6 {
        let ans = post(
            &a,
            &format!("http://{addr}/v2/flux-img2img"),
            Some(KEY),
            &body(&json!({ "image": img, "steps": 8, "seed": seed })),
        );
        assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
        ids.push(ans.json()["request_id"].as_str().unwrap().to_string());
    }
    // Kill while a job runs, if the machine lets us catch one.
    let deadline = Instant::now() + Duration::from_mins(1);
    while Instant::now() < deadline {
        let s = get(
            &a,
            &format!("http://{addr}/v2/requests/{}/status", ids[ids.len() - 1]),
            Some(KEY),
        );
        let any_processing = ids.iter().any(|id| {
            get(
                &a,
                &format!("http://{addr}/v2/requests/{id}/status"),
                Some(KEY),
            )
            .json()["status"]
                == "PROCESSING"
        });
        if any_processing || s.json()["status"] == "COMPLETED" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (mut child, addr) = spawn(&data, &log2);
    for id in &ids {
        let v = common::wait_done(
            &a,
            &format!("http://{addr}/v2/requests/{id}/status"),
            Some(KEY),
        );
        assert_eq!(v["status"], "COMPLETED", "{id}: {v}");
        let r = get(&a, &format!("http://{addr}/v2/requests/{id}"), Some(KEY));
        assert_eq!(r.status, 200);
        assert!(
            r.json()["output"]
                .as_str()
                .is_some_and(|o| o.contains(id.as_str()))
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let logs = std::fs::read_to_string(&log1).unwrap() + &std::fs::read_to_string(&log2).unwrap();
    for id in &ids {
        let done = logs.matches(&format!("job {id} COMPLETED")).count();
        assert_eq!(done, 1, "job {id} completed {done} times:\n{logs}");
    }
}
