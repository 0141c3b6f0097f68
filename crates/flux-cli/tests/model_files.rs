//! `flux img2img` on checkpoint files written to disk: the demo model's weights saved as
//! safetensors in every layout the loaders accept (ComfyUI models folders with either folder
//! naming, explicit paths), and broken files (truncated, wrong tensor shape, missing) given on
//! the command line.

mod common;

use common::{clip_tokenizer, demo_image, t5_tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The demo checkpoint set, written once per test into its own folder.
struct Set {
    dir: tempfile::TempDir,
    files: Vec<flux_pipeline::demo::DemoFile>,
}

const NAMES: [(&str, &str); 4] = [
    ("transformer", "flux1-demo.safetensors"),
    ("vae", "ae.safetensors"),
    ("t5", "t5xxl_demo.safetensors"),
    ("clip", "clip_l.safetensors"),
];

impl Set {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t5-tokenizer.json"), t5_tokenizer()).unwrap();
        std::fs::write(dir.path().join("clip-tokenizer.json"), clip_tokenizer()).unwrap();
        let files = flux_pipeline::demo::files().expect("demo files");
        assert_eq!(files.len(), 4);
        Self { dir, files }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn file(&self, role: &str) -> &flux_pipeline::demo::DemoFile {
        self.files.iter().find(|f| f.role == role).unwrap()
    }

    /// Writes the file of `role` into `folder` (with the folder's merged config.json).
    fn put(&self, role: &str, folder: &str) -> PathBuf {
        let dir = self.path(folder);
        std::fs::create_dir_all(&dir).unwrap();
        let name = NAMES.iter().find(|(r, _)| *r == role).unwrap().1;
        let path = dir.join(name);
        std::fs::write(&path, &self.file(role).bytes).unwrap();
        let cfg_path = dir.join("config.json");
        let mut cfg: serde_json::Map<String, Value> = std::fs::read(&cfg_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Value::Object(m) = &self.file(role).config {
            cfg.extend(m.clone());
        }
        std::fs::write(&cfg_path, Value::Object(cfg).to_string()).unwrap();
        path
    }

    fn tokenizer_args(&self) -> Vec<String> {
        vec![
            "--t5-tokenizer".into(),
            self.path("t5-tokenizer.json").display().to_string(),
            "--clip-tokenizer".into(),
            self.path("clip-tokenizer.json").display().to_string(),
        ]
    }
}

fn img2img(model_args: &[String], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flux"))
        .args(["img2img", "--image"])
        .arg(demo_image())
        .args(["--prompt", "a red cab", "--steps", "2", "--seed", "7"])
        .args(model_args)
        .arg("--out")
        .arg(out)
        .env_remove("FLUX_MODEL_DIR")
        .output()
        .expect("flux runs")
}

fn decode(path: &Path) -> image::RgbImage {
    image::open(path).expect("output decodes").to_rgb8()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "flux failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn every_layout_loads_and_gives_the_same_image() {
    let set = Set::new();
    let mut outputs = Vec::new();

    // ComfyUI models folder, current naming.
    set.put("transformer", "comfy/diffusion_models");
    set.put("vae", "comfy/vae");
    set.put("t5", "comfy/text_encoders");
    set.put("clip", "comfy/text_encoders");
    // ComfyUI models folder, older naming.
    set.put("transformer", "legacy/unet");
    set.put("vae", "legacy/vae");
    set.put("t5", "legacy/clip");
    set.put("clip", "legacy/clip");
    for (layout, folder) in [("comfy", "comfy"), ("legacy", "legacy")] {
        let out = set.path(&format!("{layout}.png"));
        let mut args = vec![
            "--model-dir".to_string(),
            set.path(folder).display().to_string(),
        ];
        args.extend(set.tokenizer_args());
        let o = img2img(&args, &out);
        ok(&o);
        outputs.push((layout, out));
    }

    // Explicit paths, each file in a folder of its own.
    let mut args = Vec::new();
    for (role, _) in NAMES {
        let p = set.put(role, &format!("explicit/{role}"));
        args.push(format!("--{role}"));
        args.push(p.display().to_string());
    }
    args.extend(set.tokenizer_args());
    let out = set.path("explicit.png");
    ok(&img2img(&args, &out));
    outputs.push(("explicit", out));

    let input = decode(&demo_image());
    let first = std::fs::read(&outputs[0].1).unwrap();
    for (layout, out) in &outputs {
        let img = decode(out);
        assert_eq!(img.dimensions(), input.dimensions(), "{layout}");
        assert_ne!(img, input, "{layout}: denoise 0.75 must change the image");
        let bytes = std::fs::read(out).unwrap();
        assert_eq!(bytes, first, "{layout}: same files, same seed, same bytes");
        assert!(
            !bytes
                .windows(20)
                .any(|w| w == b"built-in demo model ".as_slice()),
            "{layout}: a model loaded from files is not labelled as the demo"
        );
    }
}

/// The demo file of `role` with one tensor's first dimension made one smaller.
fn with_wrong_shape(bytes: &[u8], tensor: &str) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut entries: Vec<(String, Value)> = header.into_iter().collect();
    entries.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64());
    let mut out_header = serde_json::Map::new();
    let mut out_data = Vec::new();
    let mut found = false;
    for (name, v) in entries {
        if name == "__metadata__" {
            continue;
        }
        let a = v["data_offsets"][0].as_u64().unwrap() as usize;
        let b = v["data_offsets"][1].as_u64().unwrap() as usize;
        let mut shape: Vec<usize> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let mut slice = &data[a..b];
        if name == tensor {
            found = true;
            let row = slice.len() / shape[0];
            shape[0] -= 1;
            slice = &slice[..slice.len() - row];
        }
        let start = out_data.len();
        out_data.extend_from_slice(slice);
        out_header.insert(
            name,
            serde_json::json!({"dtype": v["dtype"], "shape": shape, "data_offsets": [start, out_data.len()]}),
        );
    }
    assert!(found, "no tensor {tensor} in the demo file");
    let mut h = Value::Object(out_header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&out_data);
    out
}

#[test]
fn broken_checkpoints_fail_cleanly_without_output() {
    let set = Set::new();
    let mut paths = std::collections::BTreeMap::new();
    for (role, _) in NAMES {
        paths.insert(role, set.put(role, &format!("ok/{role}")));
    }
    let args_with = |role: &str, path: &Path| -> Vec<String> {
        let mut a = Vec::new();
        for (r, p) in &paths {
            a.push(format!("--{r}"));
            a.push(
                if *r == role { path } else { p.as_path() }
                    .display()
                    .to_string(),
            );
        }
        a.extend(set.tokenizer_args());
        a
    };
    let write = |name: &str, bytes: &[u8]| {
        let dir = set.path(&format!("bad-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        // The good file's config.json, so only the tensors are wrong.
        std::fs::copy(
            paths["transformer"].with_file_name("config.json"),
            dir.join("config.json"),
        )
        .unwrap();
        let p = dir.join(format!("{name}.safetensors"));
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let transformer = &set.file("transformer").bytes;
    let vae = &set.file("vae").bytes;

    let truncated_data = write("truncated-data", &transformer[..transformer.len() / 2]);
    let truncated_header = write("truncated-header", &transformer[..20]);
    let empty = write("empty", &[]);
    let wrong_shape = write(
        "wrong-shape",
        &with_wrong_shape(transformer, "double_blocks.0.img_attn.qkv.weight"),
    );
    let wrong_vae = write(
        "wrong-vae",
        &with_wrong_shape(vae, "decoder.norm_out.weight"),
    );
    let missing = set.path("no-such-file.safetensors");

    let cases: Vec<(&str, &Path, Vec<&str>)> = vec![
        (
            "transformer",
            &truncated_data,
            vec!["truncated-data.safetensors"],
        ),
        (
            "transformer",
            &truncated_header,
            vec!["truncated-header.safetensors"],
        ),
        ("transformer", &empty, vec!["empty.safetensors"]),
        (
            "transformer",
            &wrong_shape,
            vec![
                "wrong-shape.safetensors",
                "double_blocks.0.img_attn.qkv.weight",
            ],
        ),
        (
            "vae",
            &wrong_vae,
            vec!["wrong-vae.safetensors", "decoder.norm_out.weight"],
        ),
        ("vae", &missing, vec!["no-such-file.safetensors"]),
        // A CLIP file where the T5 file belongs.
        ("t5", &paths["clip"], vec!["T5"]),
    ];
    for (role, path, needles) in cases {
        let out = set.path("out.png");
        let o = img2img(&args_with(role, path), &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{role} {}: succeeded", path.display());
        assert_ne!(o.status.code(), None, "{role}: killed by a signal: {err}");
        assert!(!err.contains("panicked"), "{role}: {err}");
        for n in needles {
            assert!(
                err.contains(n),
                "{role} {}: `{n}` not in: {err}",
                path.display()
            );
        }
        assert!(!out.exists(), "{role}: a failed run left {}", out.display());
        let leftovers: Vec<_> = std::fs::read_dir(set.dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                !n.ends_with("tokenizer.json")
            })
            .map(|e| e.path())
            .collect();
        assert!(
            leftovers.is_empty(),
            "{role}: files left behind: {leftovers:?}"
        );
    }
}

#[test]
fn a_models_folder_with_a_missing_part_names_it() {
    let set = Set::new();
    set.put("transformer", "m/diffusion_models");
    set.put("t5", "m/text_encoders");
    set.put("clip", "m/text_encoders");
    let out = set.path("out.png");
    let mut args = vec![
        "--model-dir".to_string(),
        set.path("m").display().to_string(),
    ];
    args.extend(set.tokenizer_args());
    let o = img2img(&args, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("autoencoder") && err.contains("vae/"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
}
