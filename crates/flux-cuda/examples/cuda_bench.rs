//! GPU benchmarks of the CUDA backend, printed as a table (`scripts/gpu-check.sh` runs it):
//!
//! - linear layers at the Flux shapes (4608 tokens = 4096 image + 512 text at 1024x1024), bf16
//!   and fp8 (e4m3 weights and activations, `with_fp8_gemm`), as TFLOP/s and as a fraction of
//!   the card's dense bf16 peak (`--peak-tflops`, default 790, measured on an H100) or twice it
//!   for fp8;
//! - the attention kernels (exact f32 and bf16 tensor cores) at 4608 tokens, 24 heads x 128,
//!   against their FLOP floor;
//! - one full flux-dev transformer step at 1024x1024 with random weights at real sizes: bf16
//!   weights with each attention kernel, fp8 weights widened to bf16 and in fp8 GEMMs
//!   (`--skip-model` leaves it out; it needs about 24 GB of host and device memory).
//!
//! Every figure is the median of several runs after a warm-up, timed around a device sync.
//!
//! `--smoke` runs every part at tiny sizes (the same code paths, shapes still multiples of 16
//! and head dim 128, one timed run each): a check that the bench itself works, e.g. on the CPU
//! model of the CUDA libraries in CI. Its figures mean nothing.

use flux_cuda::Cuda;
use flux_kernels::{ByteView, DType, HostData, ModelOps, SamplerOps, Tensor};
use flux_model::random::random_weights;
use flux_model::transformer::{FluxConfig, FluxInputs, FluxTransformer};
use std::process::ExitCode;
use std::time::Instant;

/// What the bench runs at: the real sizes, or tiny ones (`--smoke`).
#[derive(Clone, Copy)]
struct Sizes {
    smoke: bool,
}

impl Sizes {
    /// Timed runs per figure.
    fn iters(self, real: usize) -> usize {
        if self.smoke { 1 } else { real }
    }

    /// A GEMM dimension: the real one, or 1/64 of it (still a multiple of 16).
    fn dim(self, real: usize) -> usize {
        if self.smoke { real / 64 } else { real }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `f` over `iters` runs after one warm-up, each run ending in a sync.
fn time(
    cuda: &Cuda,
    iters: usize,
    mut f: impl FnMut() -> flux_kernels::Result<()>,
) -> Result<f64, String> {
    f().map_err(|e| e.to_string())?;
    cuda.synchronize().map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        f().map_err(|e| e.to_string())?;
        cuda.synchronize().map_err(|e| e.to_string())?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bf16_weight(cuda: &Cuda, n: usize, k: usize) -> Result<Tensor<Cuda>, String> {
    let bytes: Vec<u8> = pseudo_random(n * k, 3)
        .into_iter()
        .flat_map(|v| half::bf16::from_f32(v * 0.02).to_le_bytes())
        .collect();
    cuda.upload_weight(ByteView::from_vec(bytes), &[n, k], DType::BF16, None)
        .map_err(|e| e.to_string())
}

/// Random e4m3 weights of about the same spread as [`bf16_weight`]'s, with scale 1.
fn fp8_weight(cuda: &Cuda, n: usize, k: usize) -> Result<Tensor<Cuda>, String> {
    let bytes: Vec<u8> = pseudo_random(n * k, 3)
        .into_iter()
        .map(|v| flux_kernels::cpu::f32_to_f8e4m3(v * 0.02))
        .collect();
    cuda.upload_weight(ByteView::from_vec(bytes), &[n, k], DType::F8E4M3, Some(1.0))
        .map_err(|e| e.to_string())
}

fn gemms(cuda: &Cuda, peak: f64, sz: Sizes) -> Result<(), String> {
    let m = if sz.smoke { 32 } else { 4608 };
    let fp8 = cuda.clone().with_fp8_gemm(true);
    println!(
        "| linear (M={m}) | N x K | bf16 ms | TFLOP/s | of peak | fp8 ms | TFLOP/s | of 2x peak |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, n, k) in [
        ("double qkv", 9216, 3072),
        ("double proj", 3072, 3072),
        ("double mlp up", 12288, 3072),
        ("double mlp down", 3072, 12288),
        ("single linear1", 21504, 3072),
        ("single linear2", 3072, 15360),
    ] {
        let (n, k) = (sz.dim(n), sz.dim(k));
        let w = bf16_weight(cuda, n, k)?;
        let x = cuda
            .upload(HostData::F32(&pseudo_random(m * k, 5)), &[m, k], DType::F32)
            .map_err(|e| e.to_string())?;
        let s = time(cuda, sz.iters(10), || cuda.linear(&x, &w, None).map(drop))?;
        let tflops = 2.0 * (m * n * k) as f64 / s / 1e12;
        drop(w);
        // fp8 weights and activations (the activation quantisation is inside the timing).
        let w8 = fp8_weight(cuda, n, k)?;
        let s8 = time(&fp8, sz.iters(10), || fp8.linear(&x, &w8, None).map(drop))?;
        let tflops8 = 2.0 * (m * n * k) as f64 / s8 / 1e12;
        let fp8_note = if fp8.fp8_gemm_refused(m, n, k) {
            " (refused: ran in bf16)"
        } else {
            ""
        };
        println!(
            "| {name} | {n} x {k} | {:.3} | {tflops:.1} | {:.1}% | {:.3}{fp8_note} | {tflops8:.1} | {:.1}% |",
            s * 1e3,
            100.0 * tflops / peak,
            s8 * 1e3,
            50.0 * tflops8 / peak
        );
    }
    Ok(())
}

fn attention(cuda: &Cuda, peak: f64, sz: Sizes) -> Result<(), String> {
    let (l, h, d) = if sz.smoke {
        (160usize, 2usize, 128usize)
    } else {
        (4608, 24, 128)
    };
    let mk = |seed| {
        cuda.upload(
            HostData::F32(&pseudo_random(l * h * d, seed)),
            &[1, l, h, d],
            DType::F32,
        )
        .map_err(|e| e.to_string())
    };
    let (q, k, v) = (mk(11)?, mk(12)?, mk(13)?);
    let flops = 4.0 * (l * l * d * h) as f64;
    // Floor: the FLOPs at the bf16 tensor-core peak, or moving q, k, v and out once (f32).
    let floor = (flops / (peak * 1e12)).max(4.0 * (l * h * d * 4) as f64 / 3.0e12);
    println!();
    println!("| attention {l} tok, {h}x{d} | ms | TFLOP/s | floor ms | floor / time |");
    println!("|---|---|---|---|---|");
    for (label, be) in [
        (
            "f32 in, f32 accum (exact kernel)",
            cuda.clone().with_bf16_attention(false),
        ),
        (
            "bf16 tensor cores, f32 accum",
            cuda.clone().with_bf16_attention(true),
        ),
    ] {
        let s = time(&be, sz.iters(5), || {
            be.attention(&q, &k, &v, None, None).map(drop)
        })?;
        println!(
            "| {label} | {:.3} | {:.1} | {:.3} | {:.1}% |",
            s * 1e3,
            flops / s / 1e12,
            floor * 1e3,
            100.0 * floor / s
        );
    }
    // The two kernels at this size agree to bf16 rounding (a few 1e-3); a fault gives O(1).
    let run = |bf16: bool| -> Result<Vec<f64>, String> {
        let be = cuda.clone().with_bf16_attention(bf16);
        let o = be
            .attention(&q, &k, &v, None, None)
            .map_err(|e| e.to_string())?;
        be.download_f64(&o).map_err(|e| e.to_string())
    };
    let (exact, tc) = (run(false)?, run(true)?);
    let num: f64 = exact.iter().zip(&tc).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = exact.iter().map(|a| a * a).sum();
    let rel = (num / den).sqrt();
    println!("tensor-core vs exact attention at this size: rel_l2 {rel:.2e}");
    if rel.is_nan() || rel > 2e-2 {
        return Err(format!(
            "tensor-core attention disagrees with the exact kernel (rel_l2 {rel:.2e})"
        ));
    }
    Ok(())
}

fn model_step(cuda: &Cuda, sz: Sizes) -> Result<(), String> {
    // The smoke configuration keeps flux-dev's structure with head dim 128 and widths that
    // are multiples of 16 (so the fp8 GEMMs and the tensor-core attention run).
    let cfg = if sz.smoke {
        FluxConfig {
            vec_in_dim: 32,
            context_in_dim: 64,
            hidden_size: 256,
            mlp_hidden: 512,
            num_heads: 2,
            depth: 1,
            depth_single: 1,
            axes_dim: vec![16, 56, 56],
            ..FluxConfig::dev()
        }
    } else {
        FluxConfig::dev()
    };
    let load = |dtype: DType| -> Result<FluxTransformer<Cuda>, String> {
        let t0 = Instant::now();
        let w = random_weights(&cfg, dtype, 7).map_err(|e| e.to_string())?;
        let model = FluxTransformer::load_with_config(cuda, &w, cfg.clone(), DType::F32)
            .map_err(|e| e.to_string())?;
        eprintln!(
            "random flux-dev weights ({dtype}) built and uploaded in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        Ok(model)
    };
    let (li, lt) = if sz.smoke {
        (64usize, 16usize)
    } else {
        (4096, 512)
    };
    let side = li.isqrt();
    let up = |v: Vec<f32>, shape: &[usize]| {
        cuda.upload(HostData::F32(&v), shape, DType::F32)
            .map_err(|e| e.to_string())
    };
    let img = up(pseudo_random(li * 64, 21), &[1, li, 64])?;
    let (ctx, vec) = (cfg.context_in_dim, cfg.vec_in_dim);
    let txt = up(pseudo_random(lt * ctx, 22), &[1, lt, ctx])?;
    let y = up(pseudo_random(vec, 23), &[1, vec])?;
    let img_ids = flux_model::denoiser::img_ids(1, side, side);
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
    let (hd, l) = (cfg.hidden_size as f64, (li + lt) as f64);
    let blocks = (cfg.depth + cfg.depth_single) as f64;
    let flops = 2.0 * blocks * (12.0 * hd * hd * l + 2.0 * l * l * hd);
    println!();
    let what = if sz.smoke {
        "smoke-size flux model step"
    } else {
        "flux-dev step 1024x1024"
    };
    println!("| {what}, {} tokens | ms | TFLOP/s | target |", li + lt);
    println!("|---|---|---|---|");
    let row = |label: &str, model: &FluxTransformer<Cuda>, be: Cuda| -> Result<(), String> {
        let s = time(&be, sz.iters(3), || {
            model
                .forward(&be, &inp)
                .map(drop)
                .map_err(|e| flux_kernels::KernelError::Device(e.to_string()))
        })?;
        println!(
            "| {label} | {:.1} | {:.1} | <= 120 ms (H100) |",
            s * 1e3,
            flops / s / 1e12
        );
        Ok(())
    };
    let model = load(DType::BF16)?;
    row(
        "bf16 weights, exact f32 attention",
        &model,
        cuda.clone().with_bf16_attention(false),
    )?;
    row(
        "bf16 weights, bf16 tensor-core attention",
        &model,
        cuda.clone().with_bf16_attention(true),
    )?;
    drop(model);
    let model = load(DType::F8E4M3)?;
    row(
        "fp8 weights (widened to bf16), bf16 attention",
        &model,
        cuda.clone().with_bf16_attention(true),
    )?;
    row(
        "fp8 weights, fp8 GEMMs, bf16 attention",
        &model,
        cuda.clone().with_bf16_attention(true).with_fp8_gemm(true),
    )?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut peak = 790.0;
    let mut skip_model = false;
    let mut sz = Sizes { smoke: false };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--skip-model" => skip_model = true,
            "--smoke" => sz.smoke = true,
            "--peak-tflops" => match it.next().and_then(|v| v.parse::<f64>().ok()) {
                Some(p) if p > 0.0 => peak = p,
                _ => {
                    eprintln!("--peak-tflops needs a positive number");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!(
                    "unknown argument '{other}' (known: --skip-model, --smoke, --peak-tflops X)"
                );
                return ExitCode::from(2);
            }
        }
    }
    let cuda = match Cuda::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cuda_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "device: {} (peak for the fractions: {peak} TFLOP/s)",
        cuda.name()
    );
    let mut ok = true;
    let mut report = |what: &str, r: Result<(), String>| {
        if let Err(e) = r {
            eprintln!("{what} failed: {e}");
            ok = false;
        }
    };
    if sz.smoke {
        println!("smoke run: tiny sizes, one timed run each; the figures mean nothing");
    }
    report("GEMM bench", gemms(&cuda, peak, sz));
    report("attention bench", attention(&cuda, peak, sz));
    if !skip_model {
        report("transformer step", model_step(&cuda, sz));
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
