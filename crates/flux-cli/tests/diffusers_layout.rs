//! `flux img2img --model-dir` on the demo model written as a diffusers folder (the layout of the
//! FLUX.1 repositories): transformer under the diffusers names in two shards with an index,
//! autoencoder under the diffusers names with linear attention weights, T5 in two shards with
//! an index, CLIP in one file, both tokenizers beside them. The image must be byte-identical to
//! the one made from the ComfyUI layout of the same weights. Broken shard sets fail cleanly.
//!
//! The renaming here is written from the diffusers module layouts (`FluxTransformer2DModel`,
//! `AutoencoderKL`), not taken from the loader, so a mapping error on either side shows up.

mod common;

use common::{
    Tensors, clip_tokenizer, decode, demo_image, failed, flux, ok, read_safetensors, t5_tokenizer,
    write_safetensors,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn demo_file(role: &str) -> flux_pipeline::demo::DemoFile {
    flux_pipeline::demo::files()
        .expect("demo files")
        .into_iter()
        .find(|f| f.role == role)
        .unwrap()
}

/// Rows `from..to` of a tensor (split along its first dimension).
fn rows(t: &(Vec<usize>, Vec<f32>), from: usize, to: usize) -> (Vec<usize>, Vec<f32>) {
    let row: usize = t.0[1..].iter().product();
    let mut shape = t.0.clone();
    shape[0] = to - from;
    (shape, t.1[from * row..to * row].to_vec())
}

/// The demo transformer under diffusers' `FluxTransformer2DModel` names.
fn transformer_to_diffusers(bfl: &Tensors, hidden: usize) -> Tensors {
    let mut out = Tensors::new();
    for (name, t) in bfl {
        let (stem, param) = name.rsplit_once('.').unwrap();
        let parts: Vec<&str> = stem.split('.').collect();
        let mut put = |n: String, v: (Vec<usize>, Vec<f32>)| {
            assert!(out.insert(n.clone(), v).is_none(), "{n} written twice");
        };
        let whole = |d: &str| format!("{d}.{param}");
        match parts.as_slice() {
            ["img_in"] => put(whole("x_embedder"), t.clone()),
            ["txt_in"] => put(whole("context_embedder"), t.clone()),
            [emb @ ("time_in" | "guidance_in" | "vector_in"), layer] => {
                let d = match *emb {
                    "time_in" => "timestep_embedder",
                    "guidance_in" => "guidance_embedder",
                    _ => "text_embedder",
                };
                let l = if *layer == "in_layer" {
                    "linear_1"
                } else {
                    "linear_2"
                };
                put(whole(&format!("time_text_embed.{d}.{l}")), t.clone());
            }
            ["double_blocks", i, rest @ ..] => {
                let b = format!("transformer_blocks.{i}");
                let simple = match rest {
                    ["img_mod", "lin"] => Some("norm1.linear"),
                    ["txt_mod", "lin"] => Some("norm1_context.linear"),
                    ["img_attn", "proj"] => Some("attn.to_out.0"),
                    ["txt_attn", "proj"] => Some("attn.to_add_out"),
                    ["img_mlp", "0"] => Some("ff.net.0.proj"),
                    ["img_mlp", "2"] => Some("ff.net.2"),
                    ["txt_mlp", "0"] => Some("ff_context.net.0.proj"),
                    ["txt_mlp", "2"] => Some("ff_context.net.2"),
                    _ => None,
                };
                if let Some(d) = simple {
                    put(whole(&format!("{b}.{d}")), t.clone());
                    continue;
                }
                match rest {
                    [s @ ("img_attn" | "txt_attn"), "qkv"] => {
                        let names = if *s == "img_attn" {
                            ["to_q", "to_k", "to_v"]
                        } else {
                            ["add_q_proj", "add_k_proj", "add_v_proj"]
                        };
                        for (k, n) in names.iter().enumerate() {
                            put(
                                whole(&format!("{b}.attn.{n}")),
                                rows(t, k * hidden, (k + 1) * hidden),
                            );
                        }
                    }
                    [s @ ("img_attn" | "txt_attn"), "norm", which] if param == "scale" => {
                        let n = match (*s, *which) {
                            ("img_attn", "query_norm") => "norm_q",
                            ("img_attn", _) => "norm_k",
                            (_, "query_norm") => "norm_added_q",
                            _ => "norm_added_k",
                        };
                        put(format!("{b}.attn.{n}.weight"), t.clone());
                    }
                    _ => panic!("no diffusers name for {name}"),
                }
            }
            ["single_blocks", i, rest @ ..] => {
                let b = format!("single_transformer_blocks.{i}");
                match rest {
                    ["modulation", "lin"] => put(whole(&format!("{b}.norm.linear")), t.clone()),
                    ["linear2"] => put(whole(&format!("{b}.proj_out")), t.clone()),
                    ["linear1"] => {
                        for (k, n) in ["attn.to_q", "attn.to_k", "attn.to_v"].iter().enumerate() {
                            put(
                                whole(&format!("{b}.{n}")),
                                rows(t, k * hidden, (k + 1) * hidden),
                            );
                        }
                        put(whole(&format!("{b}.proj_mlp")), rows(t, 3 * hidden, t.0[0]));
                    }
                    ["norm", which] if param == "scale" => {
                        let n = if *which == "query_norm" {
                            "norm_q"
                        } else {
                            "norm_k"
                        };
                        put(format!("{b}.attn.{n}.weight"), t.clone());
                    }
                    _ => panic!("no diffusers name for {name}"),
                }
            }
            ["final_layer", "linear"] => put(whole("proj_out"), t.clone()),
            ["final_layer", "adaLN_modulation", "1"] => {
                // diffusers keeps (scale, shift), the reference (shift, scale).
                let h = t.0[0] / 2;
                let (shift, scale) = (rows(t, 0, h), rows(t, h, 2 * h));
                let mut v = scale.1;
                v.extend_from_slice(&shift.1);
                put(whole("norm_out.linear"), (t.0.clone(), v));
            }
            _ => panic!("no diffusers name for {name}"),
        }
    }
    out
}

/// The demo autoencoder under diffusers' `AutoencoderKL` names (`levels` decoder levels).
fn vae_to_diffusers(bfl: &Tensors, levels: usize) -> Tensors {
    fn resnet(l: &str) -> &str {
        if l == "nin_shortcut" {
            "conv_shortcut"
        } else {
            l
        }
    }
    let mut out = Tensors::new();
    for (name, t) in bfl {
        let (stem, param) = name.rsplit_once('.').unwrap();
        let parts: Vec<&str> = stem.split('.').collect();
        let side = parts[0];
        let mut t = t.clone();
        let d = match &parts[1..] {
            ["conv_in"] => "conv_in".to_string(),
            ["conv_out"] => "conv_out".to_string(),
            ["norm_out"] => "conv_norm_out".to_string(),
            ["down", i, "block", j, l] => format!("down_blocks.{i}.resnets.{j}.{}", resnet(l)),
            ["down", i, "downsample", "conv"] => format!("down_blocks.{i}.downsamplers.0.conv"),
            ["up", i, "block", j, l] => {
                let k = levels - 1 - i.parse::<usize>().unwrap();
                format!("up_blocks.{k}.resnets.{j}.{}", resnet(l))
            }
            ["up", i, "upsample", "conv"] => {
                let k = levels - 1 - i.parse::<usize>().unwrap();
                format!("up_blocks.{k}.upsamplers.0.conv")
            }
            ["mid", "block_1", l] => format!("mid_block.resnets.0.{l}"),
            ["mid", "block_2", l] => format!("mid_block.resnets.1.{l}"),
            ["mid", "attn_1", l] => {
                let n = match *l {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => panic!("no diffusers name for {name}"),
                };
                if param == "weight" && *l != "norm" {
                    // Linear layers in diffusers: [C, C, 1, 1] -> [C, C].
                    assert_eq!(&t.0[2..], [1, 1], "{name}");
                    t.0.truncate(2);
                }
                format!("mid_block.attentions.0.{n}")
            }
            _ => panic!("no diffusers name for {name}"),
        };
        assert!(
            out.insert(format!("{side}.{d}.{param}"), t).is_none(),
            "{name}"
        );
    }
    out
}

/// Writes `tensors` as shards of `stem` in `dir` (split in name order) with their index.
fn write_sharded(dir: &Path, stem: &str, tensors: &Tensors, shards: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut map = serde_json::Map::new();
    let mut paths = Vec::new();
    let mut total = 0usize;
    for (k, chunk) in names.chunks(per).enumerate() {
        let file = format!("{stem}-{:05}-of-{shards:05}.safetensors", k + 1);
        let part: Tensors = chunk
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        total += part.values().map(|(_, v)| 4 * v.len()).sum::<usize>();
        for n in chunk {
            map.insert((*n).clone(), Value::String(file.clone()));
        }
        let p = dir.join(&file);
        std::fs::write(&p, write_safetensors(&part)).unwrap();
        paths.push(p);
    }
    assert_eq!(paths.len(), shards);
    let index = json!({"metadata": {"total_size": total}, "weight_map": map});
    std::fs::write(
        dir.join(format!("{stem}.safetensors.index.json")),
        index.to_string(),
    )
    .unwrap();
    paths
}

fn write_json(path: &Path, v: &Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, v.to_string()).unwrap();
}

/// The demo model as a diffusers folder under `root`.
fn write_diffusers(root: &Path) {
    let tf = demo_file("transformer");
    let cfg = flux_pipeline::demo::transformer_config();
    assert_eq!(cfg.theta, 10000.0, "diffusers configs have no theta");
    let t = transformer_to_diffusers(&read_safetensors(&tf.bytes), cfg.hidden_size);
    write_sharded(&root.join("transformer"), "diffusion_pytorch_model", &t, 2);
    write_json(
        &root.join("transformer/config.json"),
        &json!({"_class_name": "FluxTransformer2DModel",
            "num_attention_heads": cfg.num_heads, "axes_dims_rope": cfg.axes_dim,
            "guidance_embeds": cfg.guidance_embed}),
    );

    let vf = demo_file("vae");
    let vc = flux_pipeline::demo::vae_config();
    let v = vae_to_diffusers(&read_safetensors(&vf.bytes), vc.ch_mult.len());
    assert!(v.contains_key("decoder.up_blocks.0.upsamplers.0.conv.weight"));
    std::fs::create_dir_all(root.join("vae")).unwrap();
    std::fs::write(
        root.join("vae/diffusion_pytorch_model.safetensors"),
        write_safetensors(&v),
    )
    .unwrap();
    write_json(
        &root.join("vae/config.json"),
        &json!({"_class_name": "AutoencoderKL", "scaling_factor": vc.scale_factor,
            "shift_factor": vc.shift_factor, "norm_num_groups": vc.groups,
            "use_quant_conv": false, "use_post_quant_conv": false}),
    );

    let t5 = demo_file("t5");
    write_sharded(
        &root.join("text_encoder_2"),
        "model",
        &read_safetensors(&t5.bytes),
        2,
    );
    write_json(&root.join("text_encoder_2/config.json"), &t5.config);

    let clip = demo_file("clip");
    std::fs::create_dir_all(root.join("text_encoder")).unwrap();
    std::fs::write(root.join("text_encoder/model.safetensors"), &clip.bytes).unwrap();
    write_json(&root.join("text_encoder/config.json"), &clip.config);

    for (dir, text) in [
        ("tokenizer", clip_tokenizer()),
        ("tokenizer_2", t5_tokenizer()),
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::write(root.join(dir).join("tokenizer.json"), text).unwrap();
    }
    write_json(
        &root.join("model_index.json"),
        &json!({"_class_name": "FluxImg2ImgPipeline"}),
    );
}

/// The demo model as a ComfyUI models folder under `root`; returns the tokenizer flags.
fn write_comfy(root: &Path) -> Vec<String> {
    for (role, folder, file) in [
        ("transformer", "diffusion_models", "flux1-demo.safetensors"),
        ("vae", "vae", "ae.safetensors"),
        ("t5", "text_encoders", "t5xxl_demo.safetensors"),
        ("clip", "text_encoders", "clip_l.safetensors"),
    ] {
        let f = demo_file(role);
        let dir = root.join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), &f.bytes).unwrap();
        let cfg_path = dir.join("config.json");
        let mut cfg: serde_json::Map<String, Value> = std::fs::read(&cfg_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Value::Object(m) = f.config {
            cfg.extend(m);
        }
        std::fs::write(&cfg_path, Value::Object(cfg).to_string()).unwrap();
    }
    std::fs::write(root.join("t5.json"), t5_tokenizer()).unwrap();
    std::fs::write(root.join("clip.json"), clip_tokenizer()).unwrap();
    vec![
        "--t5-tokenizer".into(),
        root.join("t5.json").display().to_string(),
        "--clip-tokenizer".into(),
        root.join("clip.json").display().to_string(),
    ]
}

fn img2img(model_dir: &Path, extra: &[String], out: &Path) -> std::process::Output {
    let mut args: Vec<String> = vec!["img2img".into(), "--image".into()];
    args.push(demo_image().display().to_string());
    for a in ["--prompt", "a red cab", "--steps", "2", "--seed", "7"] {
        args.push(a.into());
    }
    args.push("--model-dir".into());
    args.push(model_dir.display().to_string());
    args.extend_from_slice(extra);
    args.push("--out".into());
    args.push(out.display().to_string());
    flux(&args)
}

#[test]
fn the_diffusers_layout_gives_the_same_image_as_the_comfyui_layout() {
    let dir = tempfile::tempdir().unwrap();
    let comfy = dir.path().join("comfy");
    let tok = write_comfy(&comfy);
    let hf = dir.path().join("hf");
    write_diffusers(&hf);

    let want = dir.path().join("comfy.png");
    ok(&img2img(&comfy, &tok, &want));
    // No tokenizer flags: the diffusers folder brings its own.
    let got = dir.path().join("hf.png");
    ok(&img2img(&hf, &[], &got));

    let input = decode(&demo_image());
    assert_ne!(decode(&got), input, "denoise 0.75 must change the image");
    assert_eq!(
        std::fs::read(&got).unwrap(),
        std::fs::read(&want).unwrap(),
        "same weights in both layouts, same seed: same bytes"
    );
}

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn broken_diffusers_folders_fail_with_the_file_and_tensor_named() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    write_diffusers(&hf);
    let out = dir.path().join("out.png");
    let check = |model: &Path, extra: &[String], needles: &[&str]| {
        let err = failed(&img2img(model, extra, &out));
        for n in needles {
            assert!(err.contains(n), "`{n}` not in: {err}");
        }
        assert!(!out.exists(), "a failed run left {}", out.display());
    };

    // The transformer's index names a shard that is not there.
    let missing_shard = dir.path().join("missing-shard");
    copy_tree(&hf, &missing_shard);
    let index_path =
        missing_shard.join("transformer/diffusion_pytorch_model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]["proj_out.weight"] =
        Value::String("diffusion_pytorch_model-00003-of-00003.safetensors".into());
    std::fs::write(&index_path, index.to_string()).unwrap();
    check(
        &missing_shard,
        &[],
        &[
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model-00003-of-00003.safetensors",
            "does not exist",
        ],
    );

    // A T5 shard lacks a tensor its index lists there.
    let missing_tensor = dir.path().join("missing-tensor");
    copy_tree(&hf, &missing_tensor);
    let index_path = missing_tensor.join("text_encoder_2/model.safetensors.index.json");
    let index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let (victim, shard) = index["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, f)| f.as_str() == Some("model-00002-of-00002.safetensors"))
        .map(|(n, f)| (n.clone(), f.as_str().unwrap().to_string()))
        .unwrap();
    let shard_path = missing_tensor.join("text_encoder_2").join(&shard);
    let mut tensors = read_safetensors(&std::fs::read(&shard_path).unwrap());
    assert!(tensors.remove(&victim).is_some());
    std::fs::write(&shard_path, write_safetensors(&tensors)).unwrap();
    check(&missing_tensor, &[], &[&victim, &shard, "does not hold it"]);

    // No tokenizer_2/: the T5 tokenizer is named, and a flag can stand in for it.
    let no_tok = dir.path().join("no-tokenizer");
    copy_tree(&hf, &no_tok);
    std::fs::remove_dir_all(no_tok.join("tokenizer_2")).unwrap();
    check(&no_tok, &[], &["--t5-tokenizer", "tokenizer_2"]);
    let t5 = dir.path().join("t5-tokenizer.json");
    std::fs::write(&t5, t5_tokenizer()).unwrap();
    ok(&img2img(
        &no_tok,
        &["--t5-tokenizer".into(), t5.display().to_string()],
        &out,
    ));
    std::fs::remove_file(&out).unwrap();

    // A folder of neither layout lists what was looked for.
    let neither = dir.path().join("neither");
    std::fs::create_dir_all(neither.join("weights")).unwrap();
    check(
        &neither,
        &[],
        &["not a models folder", "transformer/", "diffusion_models/"],
    );
}
