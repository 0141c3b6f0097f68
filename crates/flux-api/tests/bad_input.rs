//! Every field missing, of the wrong type, out of range or an unknown name; broken images,
//! non-image URLs and oversized bodies: each gets the right status and a message naming the
//! field, and the server keeps serving.

mod common;

use common::{KEY, agent, body, get, post, small_image_b64, start, wait_done};
use flux_pipeline::image_io::to_base64;
use serde_json::json;
use std::io::{Read as _, Write as _};

/// A one-thread HTTP server on loopback answering every request with `content_type` and `body`.
fn static_http(content_type: &'static str, body: &'static [u8]) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut s = stream;
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(body);
        }
    });
    addr
}

#[test]
fn bad_inputs_get_400_naming_the_field_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.max_body_bytes = 64 * 1024;
    // The non-image URL below is on loopback.
    cfg.fetch.allow_private = true;
    let server = start(cfg);
    let html = static_http("text/html", b"<html><body>not an image</body></html>");
    let a = agent();
    let img = small_image_b64();
    let with = |field: &str, value: serde_json::Value| body(&json!({ field: value }));
    let without = |field: &str| {
        let mut v: serde_json::Value = serde_json::from_slice(&body(&json!({}))).unwrap();
        v.as_object_mut().unwrap().remove(field);
        serde_json::to_vec(&v).unwrap()
    };
    let not_image = to_base64(b"this is plain text, long enough to look like base64 data......");
    // 70000x1: with its short side raised to 16 pixels it cannot fit the megapixel cap.
    let mut elongated = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::new(70000, 1))
        .write_to(&mut elongated, image::ImageFormat::Png)
        .unwrap();
    let elongated = to_base64(elongated.get_ref());
    let cases: Vec<(&str, Vec<u8>, u16, Vec<&str>)> = vec![
        (
            "prompt missing",
            without("prompt"),
            400,
            vec!["prompt", "required"],
        ),
        (
            "prompt number",
            with("prompt", json!(5)),
            400,
            vec!["prompt", "string", "5"],
        ),
        (
            "prompt empty",
            with("prompt", json!("  ")),
            400,
            vec!["prompt", "empty"],
        ),
        (
            "prompt too long",
            with("prompt", json!("x".repeat(10_001))),
            400,
            vec!["prompt", "10000"],
        ),
        (
            "image missing",
            without("image"),
            400,
            vec!["image", "required"],
        ),
        (
            "image bool",
            with("image", json!(true)),
            400,
            vec!["image", "boolean"],
        ),
        (
            "image not base64",
            with("image", json!("not an image!!")),
            400,
            vec!["image", "base64"],
        ),
        (
            "image not an image",
            with("image", json!(not_image)),
            400,
            vec!["image", "PNG, JPEG or WebP"],
        ),
        (
            "image too elongated",
            with("image", json!(elongated)),
            400,
            vec!["image", "70000x1", "elongated"],
        ),
        (
            "denoise too small for the steps",
            body(&json!({ "steps": 50, "denoise": 0.00001 })),
            400,
            vec!["denoise", "5000000", "at most 1000000"],
        ),
        (
            "kl_optimal over one step",
            body(&json!({ "steps": 1, "scheduler": "kl_optimal" })),
            400,
            vec!["steps", "kl_optimal", "at least 2"],
        ),
        (
            "image ftp url",
            with("image", json!("ftp://example.com/a.png")),
            400,
            vec!["image", "ftp"],
        ),
        (
            "image file url",
            with("image", json!("file:///etc/passwd")),
            400,
            vec!["image", "file"],
        ),
        (
            "image data uri not base64",
            with("image", json!("data:image/png,abc")),
            400,
            vec!["image", "base64"],
        ),
        (
            "image url not an image",
            with("image", json!(format!("http://{html}/page.html"))),
            400,
            vec!["image", "PNG, JPEG or WebP"],
        ),
        (
            "image url without host",
            with("image", json!("http:///x.png")),
            400,
            vec!["image", "URL"],
        ),
        (
            "steps string",
            with("steps", json!("20")),
            400,
            vec!["steps", "integer", "\"20\""],
        ),
        (
            "steps zero",
            with("steps", json!(0)),
            400,
            vec!["steps", "0", "1 to 50"],
        ),
        (
            "steps too many",
            with("steps", json!(51)),
            400,
            vec!["steps", "51", "1 to 50"],
        ),
        (
            "steps fraction",
            with("steps", json!(2.5)),
            400,
            vec!["steps", "2.5"],
        ),
        (
            "steps negative",
            with("steps", json!(-1)),
            400,
            vec!["steps", "-1"],
        ),
        (
            "seed string",
            with("seed", json!("x")),
            400,
            vec!["seed", "integer"],
        ),
        (
            "seed negative",
            with("seed", json!(-5)),
            400,
            vec!["seed", "-5"],
        ),
        (
            "seed fraction",
            with("seed", json!(1.5)),
            400,
            vec!["seed", "1.5"],
        ),
        (
            "denoise string",
            with("denoise", json!("0.5")),
            400,
            vec!["denoise", "number"],
        ),
        (
            "denoise above 1",
            with("denoise", json!(1.5)),
            400,
            vec!["denoise", "1.5", "0 to 1"],
        ),
        (
            "denoise negative",
            with("denoise", json!(-0.1)),
            400,
            vec!["denoise", "-0.1"],
        ),
        (
            "scheduler number",
            with("scheduler", json!(5)),
            400,
            vec!["scheduler", "number 5"],
        ),
        (
            "scheduler unknown",
            with("scheduler", json!("nope")),
            400,
            vec!["scheduler", "nope", "simple", "karras"],
        ),
        (
            "sampler number",
            with("sampler_name", json!(false)),
            400,
            vec!["sampler_name", "boolean"],
        ),
        (
            "sampler unknown",
            with("sampler_name", json!("nope")),
            400,
            vec!["sampler_name", "nope", "euler", "dpmpp_2m"],
        ),
        (
            "base64 string",
            with("base64", json!("yes")),
            400,
            vec!["base64", "true or false"],
        ),
        (
            "image_format unknown",
            with("image_format", json!("gif")),
            400,
            vec!["image_format", "gif", "png"],
        ),
        ("body not json", b"{not json".to_vec(), 400, vec!["JSON"]),
        (
            "body an array",
            b"[1, 2]".to_vec(),
            400,
            vec!["JSON object"],
        ),
        (
            "body too large",
            format!(
                "{{\"prompt\": \"p\", \"image\": \"{}\"}}",
                "A".repeat(100 * 1024)
            )
            .into_bytes(),
            413,
            vec!["body", "65536"],
        ),
    ];
    assert!(cases.len() > 30);
    for route in ["/v2/flux-img2img", "/v1/flux-img2img"] {
        for (name, b, status, needles) in &cases {
            let ans = post(&a, &server.url(route), Some(KEY), b);
            assert_eq!(
                ans.status,
                *status,
                "{route} {name}: {}",
                String::from_utf8_lossy(&ans.body)
            );
            let msg = ans.error();
            for n in needles {
                assert!(msg.contains(n), "{route} {name}: error {msg:?} lacks {n:?}");
            }
        }
    }
    // Still serving: health, and a valid job runs to completion.
    assert_eq!(get(&a, &server.url("/healthz"), None).status, 200);
    let ok = post(
        &a,
        &server.url("/v2/flux-img2img"),
        Some(KEY),
        &body(&json!({ "image": img })),
    );
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let v = ok.json();
    let done = wait_done(&a, v["status_url"].as_str().unwrap(), Some(KEY));
    assert_eq!(done["status"], "COMPLETED", "{done}");
    // No bad request left a job behind: only the valid one exists.
    let metrics = String::from_utf8(get(&a, &server.url("/metrics"), None).body).unwrap();
    assert!(
        metrics.contains("flux_jobs{state=\"COMPLETED\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flux_jobs{state=\"FAILED\"} 0"),
        "{metrics}"
    );
}
