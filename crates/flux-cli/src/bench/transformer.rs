//! `flux bench transformer`: one forward pass of a random-weight Flux transformer.

use anyhow::{Context, Result};
use clap::Args;
use flux_kernels::{Cpu, DType, HostData, SamplerOps};
use flux_model::random::random_weights;
use flux_model::transformer::{FluxConfig, FluxInputs, FluxTransformer};
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `flux bench transformer`.
#[derive(Args, Debug)]
pub struct TransformerBenchArgs {
    /// Hidden size.
    #[arg(long, default_value_t = 3072)]
    hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 24)]
    heads: usize,
    /// Double-stream blocks.
    #[arg(long, default_value_t = 1)]
    double: usize,
    /// Single-stream blocks.
    #[arg(long, default_value_t = 1)]
    single: usize,
    /// Image tokens.
    #[arg(long, default_value_t = 256)]
    img_tokens: usize,
    /// Text tokens.
    #[arg(long, default_value_t = 64)]
    txt_tokens: usize,
    /// Stored weight dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    weights: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// RoPE axes for a head dimension: the released split (16/56/56 of 128) scaled, kept even.
fn axes_for(head_dim: usize) -> Vec<usize> {
    if head_dim == 128 {
        return vec![16, 56, 56];
    }
    let a0 = (head_dim / 8) & !1;
    let rest = head_dim - a0;
    let a1 = (rest / 2) & !1;
    vec![a0, a1, rest - a1]
}

/// Builds the model and prints `forward_s=... gflops=...`.
pub fn run(a: &TransformerBenchArgs) -> Result<ExitCode> {
    super::set_threads(a.threads)?;
    let wdt = match a.weights.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => anyhow::bail!("--weights '{other}': expected f32 or bf16"),
    };
    if a.heads == 0 || !a.hidden.is_multiple_of(a.heads) || !(a.hidden / a.heads).is_multiple_of(2)
    {
        anyhow::bail!(
            "--hidden {} must split into --heads {} of an even head dim",
            a.hidden,
            a.heads
        );
    }
    let cfg = FluxConfig {
        hidden_size: a.hidden,
        mlp_hidden: 4 * a.hidden,
        num_heads: a.heads,
        depth: a.double,
        depth_single: a.single,
        axes_dim: axes_for(a.hidden / a.heads),
        ..FluxConfig::dev()
    };
    let w = random_weights(&cfg, wdt, 7).context("building random weights")?;
    let model = FluxTransformer::load_with_config(&Cpu, &w, cfg.clone(), DType::F32)?;
    let (li, lt) = (a.img_tokens, a.txt_tokens);
    let mut seed = 1u64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    };
    let img = Cpu.upload(HostData::F32(&rnd(li * 64)), &[1, li, 64], DType::F32)?;
    let txt = Cpu.upload(HostData::F32(&rnd(lt * 4096)), &[1, lt, 4096], DType::F32)?;
    let y = Cpu.upload(HostData::F32(&rnd(768)), &[1, 768], DType::F32)?;
    let side = (li as f64).sqrt().ceil().max(1.0) as usize;
    let img_ids: Vec<f64> = (0..li)
        .flat_map(|t| [0.0, (t / side) as f64, (t % side) as f64])
        .collect();
    let txt_ids = vec![0.0; lt * 3];
    let inp = FluxInputs {
        img: &img,
        img_ids: &img_ids,
        txt: &txt,
        txt_ids: &txt_ids,
        timesteps: &[0.5],
        y: &y,
        guidance: Some(&[3.5]),
    };
    model.forward(&Cpu, &inp)?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        model.forward(&Cpu, &inp)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let s = super::median(times);
    let (h, l) = (a.hidden as f64, (li + lt) as f64);
    let flops = 2.0 * (a.double + a.single) as f64 * (12.0 * h * h * l + 2.0 * l * l * h);
    println!("forward_s={s:.6} gflops={:.2}", flops / s / 1e9);
    Ok(ExitCode::SUCCESS)
}
