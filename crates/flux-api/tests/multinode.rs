//! Many nodes on one PostgreSQL store, as separate processes on loopback: API nodes
//! (`Role::Api`, HTTP only) and worker nodes (`run_node`), each a child process of this test
//! binary, so that they can be killed with SIGKILL. Exactly-once completion is counted from
//! the workers' own job log lines.
//!
//! Without PostgreSQL these tests are ignored ("skipped: no PostgreSQL"); under CI they run
//! and a missing server fails them.

mod common;
mod postgres_support;

use common::{KEY, agent, body, get, post};
use flux_api::keys::{KeyConfig, parse_key_line};
use flux_api::postgres::PostgresOptions;
use flux_api::{Config, Role, Server, StoreChoice};
use postgres_support::PgServer;
use serde_json::json;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NODE_ENV: &str = "FLUX_API_TEST_NODE";
const URL_ENV: &str = "FLUX_API_TEST_NODE_PG";
const LEASE_ENV: &str = "FLUX_API_TEST_NODE_LEASE_MS";
/// A key limited to one request per 10 s (a burst of one), and a key with 3 credits.
const RATED: &str = "rated-key rate=0.1/s quota=100";
const QUOTA: &str = "quota-key quota=3";

fn node_store() -> StoreChoice {
    let url = std::env::var(URL_ENV).unwrap_or_default();
    let lease_ms = std::env::var(LEASE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000);
    StoreChoice::Postgres {
        url,
        options: PostgresOptions {
            pool_size: 4,
            lease: Duration::from_millis(lease_ms),
            retry_for: Duration::from_mins(1),
            ..PostgresOptions::default()
        },
    }
}

/// Not a test on its own: an API or worker node process of the tests below.
#[test]
#[ignore = "run by the multi-node tests as their node processes"]
fn child_node() {
    let Ok(role) = std::env::var(NODE_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        if role == "api" {
            let mut cfg = Config::new("127.0.0.1:0".parse().unwrap(), PathBuf::from("."));
            cfg.store = node_store();
            cfg.role = Role::Api;
            cfg.keys = vec![
                KeyConfig::unlimited(KEY),
                parse_key_line(RATED).unwrap(),
                parse_key_line(QUOTA).unwrap(),
            ];
            let server = Server::start(cfg, common::demo_factory())
                .await
                .expect("API node starts");
            println!("ADDR {}", server.addr);
            server.run(std::future::pending()).await.unwrap();
        } else {
            println!("ADDR worker");
            flux_api::run_node(
                &node_store(),
                1,
                common::demo_factory(),
                std::future::pending(),
            )
            .await
            .expect("worker node runs");
        }
    });
}

/// A node process; killed (SIGKILL) when dropped.
struct Node {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Node {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(role: &str, pg: &PgServer, lease: Duration, dir: &Path, name: &str) -> Node {
    let log = dir.join(format!("{name}.log"));
    let stderr = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_node", "--exact", "--ignored", "--nocapture"])
        .env(NODE_ENV, role)
        .env(URL_ENV, pg.url())
        .env(LEASE_ENV, lease.as_millis().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(Ok(line)) = out.next() {
        if let Some(addr) = line.strip_prefix("ADDR ") {
            // Keep reading: the test harness in the child writes to stdout later (e.g. "has
            // been running for over 60 seconds"), and a closed pipe would end it.
            std::thread::spawn(move || out.for_each(drop));
            return Node {
                child,
                addr: addr.trim().to_string(),
                log,
            };
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "{name} exited before starting:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

fn submit(a: &ureq::Agent, node: &Node, extra: &serde_json::Value) -> String {
    let ans = post(a, &node.url("/v2/flux-img2img"), Some(KEY), &body(extra));
    assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
    ans.json()["request_id"].as_str().unwrap().to_string()
}

/// Every id completed exactly once according to the workers' logs.
fn assert_completed_once(ids: &[String], workers: &[Node]) {
    let logs: String = workers.iter().map(Node::log).collect();
    for id in ids {
        let done = logs.matches(&format!("job {id} COMPLETED")).count();
        assert_eq!(done, 1, "job {id} completed {done} times:\n{logs}");
    }
}

#[test]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
fn two_api_nodes_and_three_workers_complete_every_job_once() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_secs(10);
    let mut api = vec![
        spawn("api", &pg, lease, dir.path(), "api-0"),
        spawn("api", &pg, lease, dir.path(), "api-1"),
    ];
    let workers: Vec<Node> = (0..3)
        .map(|i| spawn("worker", &pg, lease, dir.path(), &format!("worker-{i}")))
        .collect();

    // 100 jobs from 4 clients, alternating between the API nodes.
    let ids: Vec<(usize, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|c| {
                let api = &api;
                s.spawn(move || {
                    let a = agent();
                    (0..25)
                        .map(|i| {
                            let n = (c + i) % 2;
                            (n, submit(&a, &api[n], &json!({ "seed": c * 100 + i })))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(ids.len(), 100);
    let a = agent();
    for (n, id) in &ids {
        // Status from the node that did not take the job.
        let other = &api[1 - n];
        let v = common::wait_done(
            &a,
            &other.url(&format!("/v2/requests/{id}/status")),
            Some(KEY),
        );
        assert_eq!(v["status"], "COMPLETED", "{id}: {v}");
    }
    for (_, id) in &ids {
        for node in &api {
            let r = get(&a, &node.url(&format!("/v2/requests/{id}")), Some(KEY));
            assert_eq!(r.status, 200, "{id}");
            let v = r.json();
            assert_eq!(v["status"], "COMPLETED");
            assert_eq!(v["metadata"]["attempts"], 1, "{v}");
            let output = v["output"].as_str().expect("output URL").to_string();
            assert!(output.contains(id.as_str()), "{output}");
        }
    }
    let all: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    assert_completed_once(&all, &workers);

    // The synchronous route on an API-only node waits through the database.
    let r = post(
        &a,
        &api[0].url("/v1/flux-img2img"),
        Some(KEY),
        &body(&json!({})),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.content_type, "image/jpeg");
    assert_eq!(&r.body[..2], b"\xff\xd8");

    // A rate limit holds across nodes: one token, taken on node 0, is gone on node 1; the
    // 429 still carries the key's credits.
    let id0 = &all[0];
    let first = get(
        &a,
        &api[0].url(&format!("/v2/requests/{id0}/status")),
        Some("rated-key"),
    );
    assert_eq!(
        first.status, 404,
        "another key's job is not found, after the token is taken"
    );
    assert_eq!(first.credits.as_deref(), Some("100"));
    let second = get(
        &a,
        &api[1].url(&format!("/v2/requests/{id0}/status")),
        Some("rated-key"),
    );
    assert_eq!(
        second.status,
        429,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    assert!(second.retry_after.is_some());
    assert_eq!(second.credits.as_deref(), Some("100"));

    // Credits hold across nodes: 3 submissions on either node, then 406 on both.
    for i in 0..3 {
        let r = post(
            &a,
            &api[i % 2].url("/v2/flux-img2img"),
            Some("quota-key"),
            &body(&json!({})),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.credits, Some((2 - i).to_string()));
    }
    for node in &api {
        let r = post(
            &a,
            &node.url("/v2/flux-img2img"),
            Some("quota-key"),
            &body(&json!({})),
        );
        assert_eq!(r.status, 406);
        assert_eq!(r.credits.as_deref(), Some("0"));
    }

    // Kill an API node: the other keeps serving every job and takes new ones.
    api[0].kill();
    for (_, id) in &ids {
        let r = get(
            &a,
            &api[1].url(&format!("/v2/requests/{id}/status")),
            Some(KEY),
        );
        assert_eq!(r.status, 200, "{id}");
    }
    let late = submit(&a, &api[1], &json!({}));
    let v = common::wait_done(
        &a,
        &api[1].url(&format!("/v2/requests/{late}/status")),
        Some(KEY),
    );
    assert_eq!(v["status"], "COMPLETED", "{v}");
}

#[test]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
fn a_killed_workers_job_is_claimed_again_after_its_lease() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_secs(2);
    let api = spawn("api", &pg, lease, dir.path(), "api");
    let mut workers: Vec<Node> = (0..2)
        .map(|i| spawn("worker", &pg, lease, dir.path(), &format!("worker-{i}")))
        .collect();
    let a = agent();
    // Slow jobs (a larger image, many steps), so that one can be caught running.
    let img = flux_pipeline::image_io::to_base64(&common::png(128, 128));
    let ids: Vec<String> = (0..3)
        .map(|seed| {
            submit(
                &a,
                &api,
                &json!({ "image": img, "steps": 40, "seed": seed }),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_mins(2);
    let (victim, job) = loop {
        assert!(Instant::now() < deadline, "no job was seen running");
        let running = ids.iter().find(|id| {
            let v = get(
                &a,
                &api.url(&format!("/v2/requests/{id}/status")),
                Some(KEY),
            )
            .json();
            v["status"] == "PROCESSING" && v["progress"]["step"].as_u64().is_some_and(|s| s >= 1)
        });
        if let Some(id) = running {
            let owner = workers
                .iter()
                .position(|w| w.log().contains(&format!("job {id} PROCESSING")));
            if let Some(w) = owner {
                break (w, id.clone());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    workers[victim].kill(); // SIGKILL in the middle of the job
    let killed_log = workers[victim].log();
    assert!(
        !killed_log.contains(&format!("job {job} COMPLETED")),
        "the job finished before the kill; make the jobs slower"
    );
    for id in &ids {
        let v = common::wait_done(
            &a,
            &api.url(&format!("/v2/requests/{id}/status")),
            Some(KEY),
        );
        assert_eq!(v["status"], "COMPLETED", "{id}: {v}");
    }
    let r = get(&a, &api.url(&format!("/v2/requests/{job}")), Some(KEY)).json();
    assert_eq!(r["metadata"]["attempts"], 2, "re-claimed once: {r}");
    let survivor = &workers[1 - victim];
    assert!(
        survivor
            .log()
            .contains(&format!("job {job} PROCESSING on worker-0 (attempt 2)")),
        "{}",
        survivor.log()
    );
    assert_completed_once(&ids, &workers);
}

#[test]
#[cfg_attr(not(flux_pg_tests), ignore = "skipped: no PostgreSQL")]
fn every_queued_job_completes_across_a_database_restart() {
    let pg = PgServer::start_local(false);
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_secs(5);
    let api = spawn("api", &pg, lease, dir.path(), "api");
    let workers = vec![spawn("worker", &pg, lease, dir.path(), "worker")];
    let a = agent();
    // Jobs slow enough that most are still queued when the database goes away.
    let img = flux_pipeline::image_io::to_base64(&common::png(64, 64));
    let ids: Vec<String> = (0..12)
        .map(|seed| {
            submit(
                &a,
                &api,
                &json!({ "image": img, "steps": 20, "seed": seed }),
            )
        })
        .collect();
    let last = get(
        &a,
        &api.url(&format!("/v2/requests/{}/status", ids[ids.len() - 1])),
        Some(KEY),
    );
    assert_eq!(last.json()["status"], "QUEUED", "make the jobs slower");
    pg.stop();
    std::thread::sleep(Duration::from_secs(2));
    // While the database is away, the API answers an error, not a crash.
    let r = get(
        &a,
        &api.url(&format!("/v2/requests/{}/status", ids[0])),
        Some("no-such-key"),
    );
    assert_eq!(r.status, 401);
    pg.start_again();
    for id in &ids {
        let v = common::wait_done(
            &a,
            &api.url(&format!("/v2/requests/{id}/status")),
            Some(KEY),
        );
        assert_eq!(v["status"], "COMPLETED", "{id}: {v}\n{}", pg.log());
    }
    assert_completed_once(&ids, &workers);
}

#[test]
fn split_roles_refuse_the_single_machine_store() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = common::config(dir.path());
    cfg.role = Role::Api;
    let e = rt
        .block_on(Server::start(cfg, common::demo_factory()))
        .expect_err("an API-only node on SQLite is refused");
    let msg = e.to_string();
    assert!(
        msg.contains("--role api") && msg.contains("postgres://"),
        "{msg}"
    );
    let e = rt
        .block_on(flux_api::run_node(
            &StoreChoice::Sqlite,
            1,
            common::demo_factory(),
            std::future::ready(()),
        ))
        .expect_err("a worker node on SQLite is refused");
    let msg = e.to_string();
    assert!(
        msg.contains("flux worker") && msg.contains("SQLite"),
        "{msg}"
    );
    assert!(StoreChoice::parse("mysql://x").is_err());
    assert!(StoreChoice::parse("postgres://u@h:5432/db").is_ok_and(|s| s.is_shared()));
    assert!(StoreChoice::parse("sqlite").is_ok_and(|s| !s.is_shared()));
}
