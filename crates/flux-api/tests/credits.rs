//! `x-remaining-credits` on every answer to a key with a quota (successes, 406, 429, 400,
//! 404), and per-key rate limits, on a single-machine server.

mod common;

use common::{agent, body, get, post};
use flux_api::keys::parse_key_line;
use serde_json::json;

#[test]
fn every_answer_to_a_key_with_a_quota_carries_its_credits() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.keys.push(parse_key_line("limited quota=2").unwrap());
    cfg.keys
        .push(parse_key_line("rated quota=5 rate=0.1/s").unwrap());
    let server = common::start(cfg);
    let a = agent();
    let submit = server.url("/v2/flux-img2img");

    let first = post(&a, &submit, Some("limited"), &body(&json!({})));
    assert_eq!(first.status, 200);
    assert_eq!(first.credits.as_deref(), Some("1"));
    let id = first.json()["request_id"].as_str().unwrap().to_string();
    // A refused request costs nothing and still says what is left.
    let bad = post(&a, &submit, Some("limited"), &body(&json!({ "steps": 0 })));
    assert_eq!(bad.status, 400);
    assert_eq!(bad.credits.as_deref(), Some("1"));
    let second = post(&a, &submit, Some("limited"), &body(&json!({})));
    assert_eq!(second.status, 200);
    assert_eq!(second.credits.as_deref(), Some("0"));
    let spent = post(&a, &submit, Some("limited"), &body(&json!({})));
    assert_eq!(spent.status, 406);
    assert_eq!(spent.error(), "Not enough credits");
    assert_eq!(spent.credits.as_deref(), Some("0"));
    let status = get(
        &a,
        &server.url(&format!("/v2/requests/{id}/status")),
        Some("limited"),
    );
    assert_eq!(status.status, 200);
    assert_eq!(status.credits.as_deref(), Some("0"));
    let unknown = get(
        &a,
        &server.url("/v2/requests/no-such-id/status"),
        Some("limited"),
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.credits.as_deref(), Some("0"));
    let model = post(
        &a,
        &server.url("/v2/no-such-model"),
        Some("limited"),
        &body(&json!({})),
    );
    assert_eq!(model.status, 404);
    assert_eq!(model.credits.as_deref(), Some("0"));

    // Rate limited (a burst of one, then one per 10 s): the 429 carries the credits too.
    let ok = get(
        &a,
        &server.url(&format!("/v2/requests/{id}")),
        Some("rated"),
    );
    assert_eq!(ok.status, 404, "another key's job is hidden");
    assert_eq!(ok.credits.as_deref(), Some("5"));
    let limited = post(&a, &submit, Some("rated"), &body(&json!({})));
    assert_eq!(limited.status, 429, "{}", limited.error());
    assert!(
        limited.error().contains("rate limit"),
        "{}",
        limited.error()
    );
    assert!(limited.retry_after.is_some());
    assert_eq!(limited.credits.as_deref(), Some("5"), "no credit taken");

    // Keys without a quota, and unknown keys, get no header.
    let plain = get(
        &a,
        &server.url(&format!("/v2/requests/{id}/status")),
        Some(common::KEY),
    );
    assert_eq!(plain.status, 404, "another key's job is hidden");
    assert_eq!(plain.credits, None);
    let wrong = get(
        &a,
        &server.url(&format!("/v2/requests/{id}/status")),
        Some("wrong"),
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.credits, None);
}
