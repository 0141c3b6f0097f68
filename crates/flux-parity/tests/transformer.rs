//! Flux transformer parity on every `flux-transformer` folder of the reference data, key-layout
//! variants of the same weights, and hostile safetensors files.

use flux_kernels::{Cpu, DType, SamplerOps};
use flux_model::transformer::FluxTransformer;
use flux_model::weights::{WeightError, Weights};
use flux_parity::data::GoldenFile;
use flux_parity::find_folders;
use flux_parity::transformer::{case_names, run, run_model};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn reference_root() -> PathBuf {
    flux_parity::reference_folder("flux-tiny")
}

fn transformer_folders() -> Vec<PathBuf> {
    let folders: Vec<PathBuf> = find_folders(&reference_root())
        .expect("reference directory readable")
        .into_iter()
        .filter(|f| f.kind == "flux-transformer")
        .map(|f| f.path)
        .collect();
    assert!(!folders.is_empty(), "no flux-transformer folder found");
    folders
}

#[test]
fn every_case_matches_the_reference() {
    for folder in transformer_folders() {
        let results = run(&Cpu, &folder).expect("folder runs");
        for r in &results {
            println!("{r}");
        }
        let failed = flux_parity::failure_lines(&results);
        assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
        let names = case_names(&folder).expect("case list");
        assert!(!names.is_empty());
        for case in &names {
            let label = folder.file_name().unwrap().to_string_lossy().into_owned();
            let n = results
                .iter()
                .filter(|r| r.name.starts_with(&format!("{label}/{case} ")))
                .count();
            assert!(
                n >= 2,
                "{label}/{case}: expected the f64 and f32 checks, found {n} results"
            );
        }
    }
}

/// Raw tensors of a safetensors file: name -> (dtype, shape, bytes).
type Raw = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(path: &Path, raw: &Raw) {
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

/// Splits a tensor along dim 0 into pieces of the given row counts.
fn split_rows(
    t: &(Dtype, Vec<usize>, Vec<u8>),
    rows: &[usize],
) -> Vec<(Dtype, Vec<usize>, Vec<u8>)> {
    let row_bytes = t.2.len() / t.1[0];
    let mut at = 0;
    rows.iter()
        .map(|&r| {
            let mut s = t.1.clone();
            s[0] = r;
            let b = t.2[at * row_bytes..(at + r) * row_bytes].to_vec();
            at += r;
            (t.0, s, b)
        })
        .collect()
}

/// The diffusers names of the BFL tensors (written independently of the loader's mapping).
fn to_diffusers(raw: &Raw, hidden: usize) -> Raw {
    let mut out = Raw::new();
    let simple = [
        ("img_in.", "x_embedder."),
        ("txt_in.", "context_embedder."),
        (
            "time_in.in_layer.",
            "time_text_embed.timestep_embedder.linear_1.",
        ),
        (
            "time_in.out_layer.",
            "time_text_embed.timestep_embedder.linear_2.",
        ),
        (
            "guidance_in.in_layer.",
            "time_text_embed.guidance_embedder.linear_1.",
        ),
        (
            "guidance_in.out_layer.",
            "time_text_embed.guidance_embedder.linear_2.",
        ),
        (
            "vector_in.in_layer.",
            "time_text_embed.text_embedder.linear_1.",
        ),
        (
            "vector_in.out_layer.",
            "time_text_embed.text_embedder.linear_2.",
        ),
        ("final_layer.linear.", "proj_out."),
    ];
    for (name, t) in raw {
        let parts: Vec<&str> = name.split('.').collect();
        let suffix = parts.last().unwrap();
        if let Some((_, d)) = simple.iter().find(|(b, _)| name.starts_with(b)) {
            out.insert(format!("{d}{suffix}"), t.clone());
        } else if name.starts_with("final_layer.adaLN_modulation.1.") {
            let halves = split_rows(t, &[t.1[0] / 2, t.1[0] / 2]);
            let mut b = halves[1].2.clone();
            b.extend_from_slice(&halves[0].2);
            out.insert(format!("norm_out.linear.{suffix}"), (t.0, t.1.clone(), b));
        } else if parts[0] == "double_blocks" {
            let d = format!("transformer_blocks.{}", parts[1]);
            let rest = parts[2..].join(".");
            let map = |r: &str| -> Option<&'static str> {
                Some(match r {
                    "img_mod.lin" => "norm1.linear",
                    "txt_mod.lin" => "norm1_context.linear",
                    "img_attn.proj" => "attn.to_out.0",
                    "txt_attn.proj" => "attn.to_add_out",
                    "img_mlp.0" => "ff.net.0.proj",
                    "img_mlp.2" => "ff.net.2",
                    "txt_mlp.0" => "ff_context.net.0.proj",
                    "txt_mlp.2" => "ff_context.net.2",
                    _ => return None,
                })
            };
            let stem = parts[2..parts.len() - 1].join(".");
            if let Some(m) = map(&stem) {
                out.insert(format!("{d}.{m}.{suffix}"), t.clone());
            } else if stem == "img_attn.qkv" || stem == "txt_attn.qkv" {
                let names: [&str; 3] = if stem.starts_with("img") {
                    ["attn.to_q", "attn.to_k", "attn.to_v"]
                } else {
                    ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
                };
                for (n, p) in names.iter().zip(split_rows(t, &[hidden; 3])) {
                    out.insert(format!("{d}.{n}.{suffix}"), p);
                }
            } else {
                let n = match rest.as_str() {
                    "img_attn.norm.query_norm.scale" => "attn.norm_q.weight",
                    "img_attn.norm.key_norm.scale" => "attn.norm_k.weight",
                    "txt_attn.norm.query_norm.scale" => "attn.norm_added_q.weight",
                    "txt_attn.norm.key_norm.scale" => "attn.norm_added_k.weight",
                    other => panic!("unmapped {other}"),
                };
                out.insert(format!("{d}.{n}"), t.clone());
            }
        } else if parts[0] == "single_blocks" {
            let d = format!("single_transformer_blocks.{}", parts[1]);
            let rest = parts[2..].join(".");
            match rest.as_str() {
                "norm.query_norm.scale" => {
                    out.insert(format!("{d}.attn.norm_q.weight"), t.clone());
                }
                "norm.key_norm.scale" => {
                    out.insert(format!("{d}.attn.norm_k.weight"), t.clone());
                }
                r if r.starts_with("modulation.lin.") => {
                    out.insert(format!("{d}.norm.linear.{suffix}"), t.clone());
                }
                r if r.starts_with("linear2.") => {
                    out.insert(format!("{d}.proj_out.{suffix}"), t.clone());
                }
                r if r.starts_with("linear1.") => {
                    let m = t.1[0] - 3 * hidden;
                    let names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"];
                    for (n, p) in names
                        .iter()
                        .zip(split_rows(t, &[hidden, hidden, hidden, m]))
                    {
                        out.insert(format!("{d}.{n}.{suffix}"), p);
                    }
                }
                other => panic!("unmapped {other}"),
            }
        } else {
            panic!("unmapped {name}");
        }
    }
    out
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "flux-transformer-test-{}-{tag}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn comfy_and_diffusers_layouts_give_identical_outputs() {
    let folder = transformer_folders().into_iter().next().unwrap();
    let weights = folder.join("weights.safetensors");
    let g = GoldenFile::open(&folder.join("golden.safetensors")).unwrap();
    let case = case_names(&folder).unwrap().remove(0);
    let base = FluxTransformer::load(&Cpu, &Weights::open(&weights).unwrap(), DType::F64).unwrap();
    let (reference, _) = run_model(&Cpu, &base, &g, &case).unwrap();
    let hidden = base.config().hidden_size;
    let raw = read_raw(&weights);

    let comfy_dir = temp_dir("comfy");
    let comfy: Raw = raw
        .iter()
        .map(|(k, v)| (format!("model.diffusion_model.{k}"), v.clone()))
        .collect();
    write_raw(&comfy_dir.join("checkpoint.safetensors"), &comfy);
    std::fs::copy(folder.join("config.json"), comfy_dir.join("config.json")).unwrap();

    let diff_dir = temp_dir("diffusers");
    let tdir = diff_dir.join("transformer");
    std::fs::create_dir_all(&tdir).unwrap();
    let diff = to_diffusers(&raw, hidden);
    // Two shards, split by name.
    let (a, b): (Raw, Raw) = diff.into_iter().partition(|(k, _)| k.starts_with("single"));
    write_raw(
        &tdir.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
        &a,
    );
    write_raw(
        &tdir.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
        &b,
    );
    std::fs::copy(folder.join("config.json"), tdir.join("config.json")).unwrap();

    for (label, path) in [
        ("comfy", comfy_dir.join("checkpoint.safetensors")),
        ("diffusers", diff_dir.clone()),
    ] {
        let w = Weights::open(&path).unwrap();
        let m = FluxTransformer::load(&Cpu, &w, DType::F64).unwrap();
        assert_eq!(m.config(), base.config(), "{label}: config differs");
        let (out, _) = run_model(&Cpu, &m, &g, &case).unwrap();
        assert_eq!(out, reference, "{label}: output differs");
    }
    let _ = std::fs::remove_dir_all(comfy_dir);
    let _ = std::fs::remove_dir_all(diff_dir);
}

fn file_with(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data_len));
    v
}

#[test]
fn hostile_files_are_clear_errors() {
    let folder = transformer_folders().into_iter().next().unwrap();
    let bytes = std::fs::read(folder.join("weights.safetensors")).unwrap();

    let truncated = bytes[..bytes.len() - 100].to_vec();
    let e = Weights::from_bytes(truncated, "truncated.safetensors").unwrap_err();
    assert!(matches!(e, WeightError::Format { .. }), "{e}");
    assert!(e.to_string().contains("truncated.safetensors"), "{e}");

    let mut past_end = 1_000_000u64.to_le_bytes().to_vec();
    past_end.extend_from_slice(b"{}");
    let e = Weights::from_bytes(past_end, "long-header").unwrap_err();
    assert!(matches!(e, WeightError::Format { .. }), "{e}");
    assert!(Weights::from_bytes(vec![1, 2, 3], "tiny").is_err());

    let overlap = file_with(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        24,
    );
    let e = Weights::from_bytes(overlap, "overlap").unwrap_err();
    assert!(matches!(e, WeightError::Format { .. }), "{e}");

    let absurd = file_with(
        r#"{"a":{"dtype":"F32","shape":[0,1099511627776],"data_offsets":[0,0]}}"#,
        0,
    );
    let e = Weights::from_bytes(absurd, "absurd").unwrap_err();
    assert!(e.to_string().contains("absurd"), "{e}");
    let overflow = file_with(
        r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,16]}}"#,
        16,
    );
    assert!(Weights::from_bytes(overflow, "overflow").is_err());

    let wrong_dtype = file_with(
        r#"{"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#,
        16,
    );
    let w = Weights::from_bytes(wrong_dtype, "ints").unwrap();
    let e = w.get(&Cpu, "a", &[2]).unwrap_err();
    assert!(matches!(e, WeightError::DType { .. }), "{e}");
    let e = w.get(&Cpu, "a", &[3]).unwrap_err();
    assert!(
        e.to_string().contains("expected shape [3], found [2]"),
        "{e}"
    );
    let e = w.get(&Cpu, "b", &[2]).unwrap_err();
    assert!(matches!(e, WeightError::Missing { .. }), "{e}");

    // A model file with one tensor of the wrong shape names it.
    let mut raw = read_raw(&folder.join("weights.safetensors"));
    let t = raw.get_mut("double_blocks.0.img_attn.proj.bias").unwrap();
    t.1 = vec![t.1[0] / 2, 2];
    let dir = temp_dir("wrong-shape");
    write_raw(&dir.join("w.safetensors"), &raw);
    std::fs::copy(folder.join("config.json"), dir.join("config.json")).unwrap();
    let w = Weights::open(&dir.join("w.safetensors")).unwrap();
    let e = FluxTransformer::load(&Cpu, &w, DType::F32).err().unwrap();
    assert!(
        e.to_string().contains("double_blocks.0.img_attn.proj.bias"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
    // Downloads of a weight widen correctly (fp8 and bf16 codes are covered by the kernels).
    let t = Weights::from_bytes(
        file_with(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        ),
        "z",
    )
    .unwrap()
    .get(&Cpu, "a", &[1])
    .unwrap();
    assert_eq!(Cpu.download_f64(&t).unwrap(), vec![0.0]);
}
