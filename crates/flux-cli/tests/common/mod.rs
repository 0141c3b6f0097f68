//! Helpers shared by the command-line tests: the demo input image, small tokenizer files whose
//! ids fit the demo model, and reading/writing f32 safetensors files.

// Each test file uses only some of these.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The input image of the tests (96x64 RGB).
pub fn demo_image() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images/demo.png")
}

/// Runs `flux` with `args` (no model from the environment).
pub fn flux(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flux"))
        .args(args)
        .env_remove("FLUX_MODEL_DIR")
        .output()
        .expect("flux runs")
}

/// Asserts that a run succeeded, showing its stderr when not.
pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "flux failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Asserts that a run failed cleanly (an exit code, no panic) and returns its stderr.
pub fn failed(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "flux succeeded: {err}");
    assert_ne!(o.status.code(), None, "killed by a signal: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Largest channel difference and PSNR (dB) of two images of the same size.
pub fn compare_images(a: &image::RgbImage, b: &image::RgbImage) -> (u8, f64) {
    let (mut max, mut sq) = (0u8, 0.0f64);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sq += f64::from(d) * f64::from(d);
    }
    let mse = sq / a.as_raw().len().max(1) as f64;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    };
    (max, psnr)
}

/// The img2img job the serve tests post: the demo image and the settings of the img2img tests
/// (3 euler steps, seed 5), as JSON.
pub fn demo_job_body() -> String {
    let png = std::fs::read(demo_image()).expect("reading the demo image");
    serde_json::json!({
        "prompt": "a red cab",
        "image": flux_pipeline::image_io::to_base64(&png),
        "steps": 3,
        "seed": 5,
        "denoise": 0.75,
        "scheduler": "simple",
        "sampler_name": "euler",
        "image_format": "png",
    })
    .to_string()
}

/// Starts `flux serve` (API key `test-key`) with its workers on `backend`: the process and its
/// address, or what it wrote to stderr when it exited without listening.
pub fn start_serve(
    backend: &str,
    data_dir: &Path,
) -> Result<(std::process::Child, String), String> {
    use std::io::BufRead as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_flux"))
        .args(["serve", "--addr", "127.0.0.1:0", "--api-key", "test-key"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--backend", backend])
        .env_remove("FLUX_MODEL_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("flux serve starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = lines.find_map(|l| {
        l.ok()?
            .strip_prefix("listening on http://")
            .map(str::to_string)
    });
    if let Some(addr) = addr {
        return Ok((child, addr));
    }
    let out = child.wait_with_output().expect("flux serve exits");
    Err(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Posts `body` as a synchronous img2img request to the server at `addr`, stops it, and
/// returns the image, asserting a 200 reply and that the workers ran on `backend`.
pub fn served_image(
    backend: &str,
    mut child: std::process::Child,
    addr: &str,
    body: &str,
) -> image::RgbImage {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let reply = agent
        .post(format!("http://{addr}/v1/flux-img2img"))
        .header("x-api-key", "test-key")
        .header("content-type", "application/json")
        .send(body.as_bytes());
    let _ = child.kill();
    let out = child.wait_with_output().expect("flux serve exits");
    let log = String::from_utf8_lossy(&out.stderr);
    let mut reply = reply.expect("request answered");
    let bytes = reply.body_mut().read_to_vec().expect("reading the reply");
    assert_eq!(
        reply.status().as_u16(),
        200,
        "{backend}: {}\n{log}",
        String::from_utf8_lossy(&bytes)
    );
    // The workers say which device their pipelines were loaded on.
    let want = format!("loaded their model on backend {backend}");
    assert!(log.contains(&want), "{backend}: log lacks '{want}':\n{log}");
    image::load_from_memory(&bytes)
        .expect("the reply is an image")
        .to_rgb8()
}

/// Decodes an image file to RGB.
pub fn decode(path: &Path) -> image::RgbImage {
    image::open(path).expect("output decodes").to_rgb8()
}

fn special(id: u32, content: &str) -> String {
    format!(
        r#"{{"id":{id},"content":"{content}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#
    )
}

/// A small T5-style unigram tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2, then pieces): every id
/// fits the demo T5 vocabulary.
pub fn t5_tokenizer() -> String {
    let pieces = ["▁", "a", "b", "c", "d", "e", "r", "▁a", "▁re", "cd", "▁e"];
    let vocab: Vec<String> = ["<pad>", "</s>", "<unk>"]
        .iter()
        .map(|p| format!(r#"["{p}",0.0]"#))
        .chain(
            pieces
                .iter()
                .enumerate()
                .map(|(i, p)| format!(r#"["{p}",{}]"#, -1.0 - i as f64 * 0.1)),
        )
        .collect();
    let meta = r#"{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true}"#;
    format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,
        "added_tokens":[{},{},{}],
        "normalizer":null,"pre_tokenizer":{meta},
        "post_processor":{{"type":"TemplateProcessing",
          "single":[{{"Sequence":{{"id":"A","type_id":0}}}},{{"SpecialToken":{{"id":"</s>","type_id":0}}}}],
          "pair":[{{"Sequence":{{"id":"A","type_id":0}}}},{{"Sequence":{{"id":"B","type_id":0}}}},{{"SpecialToken":{{"id":"</s>","type_id":0}}}}],
          "special_tokens":{{"</s>":{{"id":"</s>","ids":[1],"tokens":["</s>"]}}}}}},
        "decoder":{meta},
        "model":{{"type":"Unigram","unk_id":2,"vocab":[{}],"byte_fallback":false}}}}"#,
        special(0, "<pad>"),
        special(1, "</s>"),
        special(2, "<unk>"),
        vocab.join(",")
    )
}

/// A small CLIP-style BPE tokenizer: bos/eos around the text, eos as padding.
pub fn clip_tokenizer() -> String {
    let bos = "<|startoftext|>";
    let eos = "<|endoftext|>";
    format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,
        "added_tokens":[{},{}],
        "normalizer":{{"type":"Lowercase"}},"pre_tokenizer":{{"type":"Whitespace"}},
        "post_processor":{{"type":"TemplateProcessing",
          "single":[{{"SpecialToken":{{"id":"{bos}","type_id":0}}}},{{"Sequence":{{"id":"A","type_id":0}}}},{{"SpecialToken":{{"id":"{eos}","type_id":0}}}}],
          "pair":[{{"Sequence":{{"id":"A","type_id":0}}}},{{"Sequence":{{"id":"B","type_id":0}}}}],
          "special_tokens":{{"{bos}":{{"id":"{bos}","ids":[7],"tokens":["{bos}"]}},"{eos}":{{"id":"{eos}","ids":[8],"tokens":["{eos}"]}}}}}},
        "decoder":null,
        "model":{{"type":"BPE","dropout":null,"unk_token":"{eos}","continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,
          "vocab":{{"a":0,"b":1,"c":2,"ab":3,"abc":4,"r":5,"e":6,"{bos}":7,"{eos}":8}},
          "merges":[["a","b"],["ab","c"]]}}}}"#,
        special(7, bos),
        special(8, eos),
    )
}

/// Named f32 tensors: shape and values.
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// The tensors of an f32 safetensors file.
pub fn read_safetensors(bytes: &[u8]) -> Tensors {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = Tensors::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(v["dtype"], "F32", "{name}");
        let a = v["data_offsets"][0].as_u64().unwrap() as usize;
        let b = v["data_offsets"][1].as_u64().unwrap() as usize;
        let shape = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let values = data[a..b]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.insert(name, (shape, values));
    }
    out
}

/// An f32 safetensors file of `tensors` (in name order).
pub fn write_safetensors(tensors: &Tensors) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (shape, values)) in tensors {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}
