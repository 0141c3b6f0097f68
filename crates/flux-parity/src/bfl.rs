//! Parity of the img2img chain done the BFL-demo way (`kind: "flux-pipeline"`): every run of the
//! folder's `config.json`, rebuilt here from the library's pieces (text encoders, autoencoder
//! mean, the BFL float32 schedule with its resolution-dependent shift, the recorded noise, 2x2
//! packing, Euler over tokens, unpacking, decoding).
//!
//! - f64: every stored intermediate (`f64.*`, including each Euler step's input, timestep and
//!   prediction) at rel_l2 1e-10; the chain after the text encoders is driven by the stored
//!   `txt`/`vec`, as in the ComfyUI checker (the f64 CLIP output is checked on its own at 1e-6).
//!   Skipped on a backend without f64.
//! - f32: the whole chain from the token ids in float32 against the f64 goldens within the
//!   README's float32 tolerances (encoded latent rel_l2 <= 2e-5 as the VAE; final latent and
//!   decoded image <= 1e-4, the pipeline tolerance).
//! - Both: the schedule is bit-exact against `f64.schedule_full`/`schedule_used` (computed the
//!   way PyTorch does it in float32), the seed-42 noise from the torch-compatible generator is
//!   bit-exact against `in.noise`, and the token positions are exact.

use crate::data::{DataError, Golden, GoldenFile, read_json};
use crate::report::{CaseResult, ErrorStats};
use flux_kernels::{Backend, DType};
use flux_model::Weights;
use flux_pipeline::comfy::{pack, unpack};
use flux_pipeline::flux::{FluxNet, TextNets, VaeNet, sibling_config, vae_config};
use flux_pipeline::model::{
    Autoencoder, FlowTransformer, HostTensor, TextEncoders, TransformerInputs,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// rel_l2 bound of f64 runs against the f64 goldens.
const F64_REL: f64 = 1e-10;
/// rel_l2 bound of the f64 CLIP pooled vector (see the ComfyUI checker).
const F64_VEC_REL: f64 = 1e-6;
/// rel_l2 bound of f32 runs for the final latent and the decoded image (README: pipeline).
const F32_REL_L2: f64 = 1e-4;
/// rel_l2 bound of f32 runs for the encoded latent (README: VAE).
const F32_X0_REL_L2: f64 = 2e-5;

/// One run of `config.json`.
struct BflRun {
    name: String,
    num_steps: usize,
    strength: f64,
    guidance: f64,
    noise_seed: u64,
    shift: bool,
    transformer: PathBuf,
    vae: PathBuf,
    t5: PathBuf,
    clip: PathBuf,
}

fn parse_run(folder: &Path, path: &Path, r: &Value) -> Result<BflRun, DataError> {
    let bad = |m: String| DataError::format(path, m);
    let name = r
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("a run has no `name`".into()))?
        .to_string();
    let num = |k: &str| {
        r.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| bad(format!("run {name}: `{k}` missing or not a number")))
    };
    let uint = |k: &str| {
        r.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("run {name}: `{k}` missing or not an integer")))
    };
    let weights = r
        .get("weights")
        .ok_or_else(|| bad(format!("run {name}: `weights` missing")))?;
    let file = |k: &str| {
        weights
            .get(k)
            .and_then(Value::as_str)
            .map(|s| folder.join(s))
            .ok_or_else(|| bad(format!("run {name}: `weights.{k}` missing")))
    };
    Ok(BflRun {
        num_steps: usize::try_from(uint("num_steps")?)
            .map_err(|_| bad(format!("run {name}: `num_steps` too large")))?,
        strength: num("strength")?,
        guidance: num("guidance")?,
        noise_seed: uint("noise_seed")?,
        shift: r
            .get("shift")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad(format!("run {name}: `shift` missing or not a boolean")))?,
        transformer: file("transformer")?,
        vae: file("vae")?,
        t5: file("t5")?,
        clip: file("clip")?,
        name,
    })
}

/// `torch.linspace(1, 0, n)` in float32 (PyTorch fills the first half forward from the start and
/// the second half backward from the end).
fn linspace_f32(n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![1.0];
    }
    let (start, end) = (1.0f32, 0.0f32);
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// The BFL demo's `get_schedule` as PyTorch computes it in float32: `linspace(1, 0, steps + 1)`,
/// shifted for flux-dev by `exp(mu) / (exp(mu) + (1 / t - 1))` with `mu` on the line through
/// (256 tokens, 0.5) and (4096 tokens, 1.15). PyTorch evaluates `scalar / tensor` as
/// `reciprocal(tensor) * scalar`, and its float32 kernels use the scalar rounded to float32.
pub fn bfl_schedule(num_steps: usize, image_seq_len: usize, shift: bool) -> Vec<f32> {
    let ts = linspace_f32(num_steps + 1);
    if !shift {
        return ts;
    }
    let m = (1.15 - 0.5) / (4096.0 - 256.0);
    let b = 0.5 - m * 256.0;
    let mu: f64 = m * image_seq_len as f64 + b;
    let e = mu.exp() as f32;
    ts.iter()
        .map(|&t| {
            let x = (1.0f32 / t) - 1.0;
            (1.0f32 / (e + x)) * e
        })
        .collect()
}

/// The BFL img2img start index: `int((1 - strength) * num_steps)`.
fn start_index(strength: f64, num_steps: usize) -> usize {
    ((1.0 - strength) * num_steps as f64).floor().max(0.0) as usize
}

fn rel_l2(a: &[f64], r: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(r) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn within(st: &mut ErrorStats, what: &str, a: &HostTensor, r: &Golden, tol: f64) {
    if a.data.len() != r.data.len() {
        st.violation(format!(
            "{what}: shape {:?}, reference {:?}",
            a.shape, r.shape
        ));
        return;
    }
    let e = rel_l2(&a.data, &r.data);
    st.max_rel = st.max_rel.max(e);
    for (x, y) in a.data.iter().zip(&r.data) {
        st.max_abs = st.max_abs.max((x - y).abs());
    }
    if e.is_nan() || e > tol {
        st.violation(format!("{what}: rel_l2 {e:.3e} > {tol:e}"));
    }
}

fn exact(st: &mut ErrorStats, what: &str, a: &[f64], r: &[f64]) {
    if a != r {
        let first = a
            .iter()
            .zip(r)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(r.len()));
        st.violation(format!(
            "{what}: not bit-exact ({} vs {} values, first difference at {first})",
            a.len(),
            r.len()
        ));
    }
}

/// The networks of one run.
struct Stack<B: Backend> {
    transformer: FluxNet<B>,
    vae: VaeNet<B>,
    text: TextNets<B>,
    scale: f64,
    shift: f64,
}

fn open(path: &Path) -> Result<(Weights, Option<Value>), DataError> {
    let w = Weights::open(path).map_err(|e| DataError::format(path, e.to_string()))?;
    let json = sibling_config(&w);
    Ok((w, json))
}

fn load_stack<B: Backend>(be: &B, run: &BflRun, dtype: DType) -> Result<Stack<B>, DataError> {
    let err = |p: &Path, e: flux_pipeline::PipelineError| DataError::format(p, e.to_string());
    let (tw, tj) = open(&run.transformer)?;
    let transformer =
        FluxNet::load(be, &tw, tj.as_ref(), dtype).map_err(|e| err(&run.transformer, e))?;
    let (vw, vj) = open(&run.vae)?;
    let vcfg = vae_config(&vw, vj.as_ref()).map_err(|e| err(&run.vae, e))?;
    let vae = VaeNet::load(be, &vw, vj.as_ref(), dtype).map_err(|e| err(&run.vae, e))?;
    let (t5w, t5j) = open(&run.t5)?;
    let (cw, cj) = open(&run.clip)?;
    let text = TextNets::load(be, &t5w, t5j.as_ref(), &cw, cj.as_ref(), dtype)
        .map_err(|e| err(&run.clip, e))?;
    Ok(Stack {
        transformer,
        vae,
        text,
        scale: vcfg.scale_factor,
        shift: vcfg.shift_factor,
    })
}

/// Applies `f` elementwise, rounding every result to f32 in an f32 run.
fn map2(a: &HostTensor, b: &HostTensor, dtype: DType, f: impl Fn(f64, f64) -> f64) -> HostTensor {
    let round = |v: f64| {
        if dtype == DType::F32 {
            f64::from(v as f32)
        } else {
            v
        }
    };
    HostTensor::new(
        a.shape.clone(),
        a.data
            .iter()
            .zip(&b.data)
            .map(|(&x, &y)| round(f(x, y)))
            .collect(),
    )
}

fn host(g: &Golden) -> HostTensor {
    HostTensor::new(g.shape.clone(), g.data.clone())
}

fn ids(g: &Golden) -> Vec<i64> {
    g.data.iter().map(|&v| v as i64).collect()
}

/// Runs one run of the folder in `dtype` and compares what that precision allows.
fn check_run<B: Backend>(
    stack: &Stack<B>,
    run: &BflRun,
    g: &GoldenFile,
    dtype: DType,
) -> Result<ErrorStats, String> {
    let get = |n: &str| {
        g.get(&format!("{}.{n}", run.name))
            .map_err(|e| e.to_string())
    };
    let f64_run = dtype == DType::F64;
    let round = |v: f64| {
        if f64_run { v } else { f64::from(v as f32) }
    };
    let mut st = ErrorStats::default();
    let e = |e: flux_pipeline::PipelineError| e.to_string();

    // Text conditioning.
    let (txt, vec) = stack
        .text
        .encode_ids(
            &ids(get("in.t5_input_ids")?),
            &ids(get("in.clip_input_ids")?),
            dtype,
        )
        .map_err(e)?;
    let (txt, vec) = if f64_run {
        within(&mut st, "txt", &txt, get("f64.txt")?, F64_REL);
        within(&mut st, "vec", &vec, get("f64.vec")?, F64_VEC_REL);
        (host(get("f64.txt")?), host(get("f64.vec")?))
    } else {
        (txt, vec)
    };

    // Encode: the distribution's mean, then `scale * (mean - shift)`.
    let image = host(get("in.image")?).rounded(dtype);
    let mean = stack.vae.encode_mean(&image, dtype).map_err(e)?;
    let x0 = HostTensor::new(
        mean.shape.clone(),
        mean.data
            .iter()
            .map(|&m| round(stack.scale * round(m - stack.shift)))
            .collect(),
    );
    within(
        &mut st,
        "x0_latent",
        &x0,
        get("f64.x0_latent")?,
        if f64_run { F64_REL } else { F32_X0_REL_L2 },
    );
    let [_, c, h, w] = <[usize; 4]>::try_from(x0.shape.as_slice())
        .map_err(|_| format!("encoded latent has shape {:?}", x0.shape))?;

    // Schedule.
    let seq_len = h.div_ceil(2) * w.div_ceil(2);
    let full = bfl_schedule(run.num_steps, seq_len, run.shift);
    let full: Vec<f64> = full.iter().map(|&t| f64::from(t)).collect();
    exact(
        &mut st,
        "schedule_full",
        &full,
        &get("f64.schedule_full")?.data,
    );
    let t_idx = start_index(run.strength, run.num_steps);
    let used = full.get(t_idx..).unwrap_or_default().to_vec();
    exact(
        &mut st,
        "schedule_used",
        &used,
        &get("f64.schedule_used")?.data,
    );
    let Some(&t0) = used.first() else {
        st.violation(format!("empty schedule (t_idx {t_idx})"));
        return Ok(st);
    };

    // Noise: float32 torch.randn with the run's seed, of the latent's padded shape.
    let noise_shape = [1, c, 2 * h.div_ceil(2), 2 * w.div_ceil(2)];
    let noise =
        flux_samplers::noise::randn_f32(&noise_shape, run.noise_seed).map_err(|e| e.to_string())?;
    let noise: Vec<f64> = noise.iter().map(|&v| f64::from(v)).collect();
    exact(&mut st, "in.noise", &noise, &get("in.noise")?.data);
    if noise_shape != [1, c, h, w] {
        st.violation(format!(
            "latent {h}x{w} is odd-sized: the BFL noise shape differs from the latent's"
        ));
        return Ok(st);
    }
    let noise = HostTensor::new(noise_shape.to_vec(), noise);
    let x_start = map2(&noise, &x0, dtype, |n, x| {
        round(round(t0 * n) + round(round(1.0 - t0) * x))
    });
    if f64_run {
        within(
            &mut st,
            "x_start_latent",
            &x_start,
            get("f64.x_start_latent")?,
            F64_REL,
        );
    }

    // Pack, then Euler over tokens.
    let (mut x, img_ids) = pack(&x_start).map_err(e)?;
    exact(&mut st, "img_ids", &img_ids.data, &get("f64.img_ids")?.data);
    let n_txt = txt.shape.get(1).copied().unwrap_or(0);
    let txt_ids = HostTensor::new(vec![1, n_txt, 3], vec![0.0; n_txt * 3]);
    exact(&mut st, "txt_ids", &txt_ids.data, &get("f64.txt_ids")?.data);
    if f64_run {
        within(
            &mut st,
            "x_start_tokens",
            &x,
            get("f64.x_start_tokens")?,
            F64_REL,
        );
    }
    let guidance = stack.transformer.has_guidance().then_some(run.guidance);
    let mut n_steps = 0;
    for (i, pair) in used.windows(2).enumerate() {
        let (t_cur, t_next) = (pair[0], pair[1]);
        let pred = stack
            .transformer
            .forward(
                &TransformerInputs {
                    img: &x,
                    img_ids: &img_ids,
                    txt: &txt,
                    txt_ids: &txt_ids,
                    y: &vec,
                    timestep: t_cur,
                    guidance,
                },
                dtype,
            )
            .map_err(e)?;
        if f64_run {
            let p = format!("f64.step.{i}");
            within(
                &mut st,
                &format!("step.{i}.x_in"),
                &x,
                get(&format!("{p}.x_in"))?,
                F64_REL,
            );
            exact(
                &mut st,
                &format!("step.{i}.t"),
                &[t_cur],
                &get(&format!("{p}.t"))?.data,
            );
            within(
                &mut st,
                &format!("step.{i}.pred"),
                &pred,
                get(&format!("{p}.pred"))?,
                F64_REL,
            );
        }
        let dt = round(t_next - t_cur);
        x = map2(&x, &pred, dtype, |a, v| round(a + round(dt * v)));
        n_steps += 1;
    }
    if f64_run
        && g.try_get(&format!("{}.f64.step.{n_steps}.x_in", run.name))
            .is_some()
    {
        st.violation(format!("{n_steps} Euler steps, the reference made more"));
    }
    if f64_run {
        within(
            &mut st,
            "x_end_tokens",
            &x,
            get("f64.x_end_tokens")?,
            F64_REL,
        );
    }

    // Unpack and decode (`z / scale + shift`, not clamped).
    let latent = unpack(&x, c, h, w).map_err(e)?;
    let tol = if f64_run { F64_REL } else { F32_REL_L2 };
    within(
        &mut st,
        "x_end_latent",
        &latent,
        get("f64.x_end_latent")?,
        tol,
    );
    let z = HostTensor::new(
        latent.shape.clone(),
        latent
            .data
            .iter()
            .map(|&v| round(round(v / stack.scale) + stack.shift))
            .collect(),
    );
    let decoded = stack.vae.decode(&z, dtype).map_err(e)?;
    within(&mut st, "decoded", &decoded, get("f64.decoded")?, tol);
    Ok(st)
}

/// Runs every run of a `flux-pipeline` folder on `be`, in f64 (skipped on a backend without f64)
/// and in f32.
pub fn run<B: Backend>(be: &B, folder: &Path) -> Result<Vec<CaseResult>, DataError> {
    let manifest_path = folder.join("manifest.json");
    let manifest = read_json(&manifest_path)?;
    let name_of = |k: &str, default: &str| {
        manifest
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let config_path = folder.join(name_of("config", "config.json"));
    let config = read_json(&config_path)?;
    let golden = GoldenFile::open(&folder.join(name_of("golden", "golden.safetensors")))?;
    let runs = config
        .get("runs")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(&config_path, "no `runs` array"))?;
    let mut out = Vec::new();
    for r in runs {
        let run = parse_run(folder, &config_path, r)?;
        for dtype in [DType::F64, DType::F32] {
            let label = format!("flux-pipeline/{}/{dtype}", run.name);
            if !be.supports_dtype(dtype) {
                out.push(CaseResult::skipped(
                    &label,
                    &format!("needs {dtype}; backend {} has no {dtype}", be.name()),
                ));
                continue;
            }
            let result = load_stack(be, &run, dtype)
                .map_err(|e| e.to_string())
                .and_then(|stack| check_run(&stack, &run, &golden, dtype))
                .unwrap_or_else(|e| {
                    let mut s = ErrorStats::default();
                    s.violation(e);
                    s
                });
            out.push(result.finish(&label));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{linspace_f32, start_index};

    #[test]
    fn linspace_matches_torch_halves() {
        // torch.linspace(1, 0, 7, dtype=float32): 1 - i/6 for the first half, (6 - i)/6 after.
        let v = linspace_f32(7);
        assert_eq!(v.len(), 7);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[6], 0.0);
        assert_eq!(v[3], 0.0 - (-1.0f32 / 6.0) * 3.0);
    }

    #[test]
    fn start_index_truncates() {
        assert_eq!(start_index(0.6, 6), 2);
        assert_eq!(start_index(1.0, 6), 0);
    }
}
