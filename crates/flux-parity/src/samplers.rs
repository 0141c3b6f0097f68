//! Parity of the samplers (`kind: "samplers"`): every case of the manifest is one run of a
//! ComfyUI sampler on the analytic toy model, replayed here step by step.
//!
//! - f64 cases: the sampler drives [`MixtureDenoiser`] (the exact posterior mean of the case's
//!   mixtures, with its cfg). Every model call's `x` and `sigma` is compared with `call.NNN.*`,
//!   the model's output with `call.NNN.denoised` (and `uncond_denoised` for cfg++), the number
//!   of calls with `n_model_calls`, and the result with `out_raw` / `out`. Tolerance: relative
//!   1e-10 (absolute 1e-12), except where the reference computes coefficients in float32 in a
//!   way not replicated here: `deis` (float32 integration grid and sum) and `dpm_fast` (float32
//!   time grid, and PyTorch's vectorised float32 `exp`/`expm1`, which are not correctly rounded
//!   and so cannot be reproduced bit for bit). Run closed-loop, the guided toy model amplifies those
//!   float32 roundings step after step (cfg 3 turns ~3e-7 on deis' coefficients into 1e-5 on
//!   the output), so these cases replay the recorded model outputs like the f32 cases and
//!   compare `x` and `out` at relative 1e-6 of the tensor's largest magnitude, model sigmas at
//!   relative 1e-6.
//! - f32 cases (`dtype: "f32"`): replay mode on a float32 latent. The recorded `denoised`
//!   (and `uncond_denoised`) are fed back, so only the sampler's own float32 arithmetic is
//!   compared: every `call.x` and `out` at relative 1e-5 of the tensor's largest magnitude
//!   (5e-5 for the `out` of uni_pc, whose last step cancels catastrophically in float32).
//! - Noise: the recorded `noise.NNN` are replayed in order, each request checked against
//!   `noise_sigma.NNN`. Draws recorded with `[NaN, NaN]` came from torch's global RNG
//!   (`heunpp2`'s discarded per-step `randn_like`, ddim's inpainting noise): the samplers here
//!   do not make them, so they are dropped from the replay and from the expected count.
//! - Every option of `extra_options` is mapped onto [`SamplerOptions`]; an option that cannot
//!   be mapped fails the case with its name and value.

use crate::data::{DataError, GoldenFile, read_json};
use crate::report::{CaseResult, ErrorStats};
use flux_kernels::{Backend, DType, HostData, Tensor};
use flux_samplers::noise::{RecordedDraw, ReplayNoise};
use flux_samplers::toy::{Mixture, MixtureDenoiser};
use flux_samplers::{Denoised, Denoiser, SampleContext, Sampler, SamplerError, SamplerOptions};
use flux_schedulers::ModelSampling;
use serde_json::Value;
use std::path::Path;
use std::str::FromStr;

/// Tolerances of one case.
#[derive(Clone, Copy, Debug)]
struct Tol {
    rel: f64,
    abs: f64,
    /// Scale the absolute tolerance by the reference tensor's largest magnitude (f32 cases).
    scaled: bool,
}

impl Tol {
    fn compare(&self, stats: &mut ErrorStats, what: &str, actual: &[f64], reference: &[f64]) {
        let abs = if self.scaled {
            let m = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            self.abs.max(self.rel * m)
        } else {
            self.abs
        };
        stats.compare(what, actual, reference, self.rel, abs);
    }
}

/// Runs every case listed in `folder/manifest.json` on `be`. f64 cases on a backend without
/// f64 are reported as skipped.
pub fn run<B: Backend>(be: &B, folder: &Path) -> Result<Vec<CaseResult>, DataError> {
    let manifest_path = folder.join("manifest.json");
    let manifest = read_json(&manifest_path)?;
    let cases = manifest
        .get("cases")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(&manifest_path, "`cases` must be an array"))?;
    let has_f64 = be.supports_dtype(DType::F64);
    let mut out = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        let name = case.get("name").and_then(Value::as_str).map_or_else(
            || format!("{} case {i}", manifest_path.display()),
            str::to_string,
        );
        let f64_case = case.get("dtype").and_then(Value::as_str).unwrap_or("f64") == "f64";
        if f64_case && !has_f64 {
            out.push(CaseResult::skipped(
                &name,
                &format!("f64 case; backend {} has no f64", be.name()),
            ));
            continue;
        }
        out.push(match run_case(be, folder, case, &name) {
            Ok(r) => r,
            Err(msg) => CaseResult::failed(&name, &msg),
        });
    }
    Ok(out)
}

fn str_field<'a>(case: &'a Value, name: &str) -> Result<&'a str, String> {
    case.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("manifest field `{name}` missing or not a string"))
}

fn f64_field(case: &Value, name: &str) -> Result<f64, String> {
    case.get(name)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("manifest field `{name}` missing or not a number"))
}

fn usize_field(case: &Value, name: &str) -> Result<usize, String> {
    case.get(name)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| format!("manifest field `{name}` missing or not a non-negative integer"))
}

fn mixture(case: &Value, name: &str) -> Result<Mixture, String> {
    let m = case
        .get(name)
        .ok_or_else(|| format!("manifest field `{name}` missing"))?;
    let list = |k: &str| -> Result<Vec<f64>, String> {
        m.get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("`{name}.{k}` must be an array"))?
            .iter()
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| format!("`{name}.{k}` holds a non-number {v}"))
            })
            .collect()
    };
    Mixture::new(list("w")?, list("mu")?, list("s")?).map_err(|e| format!("`{name}`: {e}"))
}

/// The case's model sampling, checked against the manifest's `model_sampling` description.
fn model_sampling(case: &Value) -> Result<ModelSampling, String> {
    let model = str_field(case, "model")?;
    let ms = case
        .get("model_sampling")
        .ok_or("manifest field `model_sampling` missing")?;
    let ty = ms.get("type").and_then(Value::as_str).unwrap_or("");
    let sampling = if ty.starts_with("ModelSamplingFlux") {
        let shift = ms
            .get("shift")
            .and_then(Value::as_f64)
            .ok_or("`model_sampling.shift` missing for a Flux model")?;
        ModelSampling::flux(shift)
    } else if ty.starts_with("ModelSamplingDiscrete") {
        let linear = ms.get("beta_schedule").and_then(Value::as_str) == Some("linear")
            && ms.get("linear_start").and_then(Value::as_f64) == Some(0.00085)
            && ms.get("linear_end").and_then(Value::as_f64) == Some(0.012)
            && ms.get("timesteps").and_then(Value::as_u64) == Some(1000);
        if !linear {
            return Err(format!(
                "model `{model}`: only the SD1.x discrete schedule (linear betas 0.00085..0.012, \
                 1000 steps) is supported, got {ms}"
            ));
        }
        ModelSampling::sd15()
    } else {
        return Err(format!(
            "model `{model}`: unknown model_sampling type '{ty}'"
        ));
    };
    // The description's sigma range must match the table we built.
    for (key, ours) in [
        ("sigma_min", sampling.sigma_min()),
        ("sigma_max", sampling.sigma_max()),
    ] {
        if let Some(v) = ms.get(key).and_then(Value::as_f64)
            && (v - ours).abs() > 1e-6 * v.abs()
        {
            return Err(format!(
                "model `{model}`: model_sampling.{key} is {v}, the table gives {ours}"
            ));
        }
    }
    Ok(sampling)
}

/// Maps the manifest's `extra_options` onto [`SamplerOptions`].
fn sampler_options(sampler: Sampler, extra: &Value) -> Result<SamplerOptions, String> {
    let mut o = SamplerOptions::default();
    let Some(map) = extra.as_object() else {
        return Err(format!("`extra_options` must be an object, got {extra}"));
    };
    let bad = |k: &str, v: &Value, why: &str| format!("extra_options.{k} = {v}: {why}");
    let num = |k: &str, v: &Value| -> Result<f64, String> {
        match v {
            Value::String(s) if s == "inf" => Ok(f64::INFINITY),
            Value::String(s) if s == "-inf" => Ok(f64::NEG_INFINITY),
            _ => v.as_f64().ok_or_else(|| bad(k, v, "expected a number")),
        }
    };
    let int = |k: &str, v: &Value| -> Result<usize, String> {
        v.as_u64()
            .map(|u| u as usize)
            .ok_or_else(|| bad(k, v, "expected a non-negative integer"))
    };
    let boolean = |k: &str, v: &Value| v.as_bool().ok_or_else(|| bad(k, v, "expected a boolean"));
    let is_uni_pc = matches!(sampler, Sampler::UniPc | Sampler::UniPcBh2);
    for (k, v) in map {
        match k.as_str() {
            "eta" => o.eta = Some(num(k, v)?),
            "s_noise" => o.s_noise = Some(num(k, v)?),
            "s_churn" => o.s_churn = Some(num(k, v)?),
            "s_tmin" => o.s_tmin = Some(num(k, v)?),
            "s_tmax" => o.s_tmax = Some(num(k, v)?),
            "r" => o.r = Some(num(k, v)?),
            "r_1" => o.r_1 = Some(num(k, v)?),
            "r_2" => o.r_2 = Some(num(k, v)?),
            "ge_gamma" => o.ge_gamma = Some(num(k, v)?),
            "rtol" => o.rtol = Some(num(k, v)?),
            "atol" => o.atol = Some(num(k, v)?),
            "h_init" => o.h_init = Some(num(k, v)?),
            "pcoeff" => o.pcoeff = Some(num(k, v)?),
            "icoeff" => o.icoeff = Some(num(k, v)?),
            "dcoeff" => o.dcoeff = Some(num(k, v)?),
            "accept_safety" => o.accept_safety = Some(num(k, v)?),
            "noise_clip_std" => o.noise_clip_std = Some(num(k, v)?),
            "s_noise_end" => o.s_noise_end = if v.is_null() { None } else { Some(num(k, v)?) },
            "max_order" => o.max_order = Some(int(k, v)?),
            "max_stage" => o.max_stage = Some(int(k, v)?),
            "predictor_order" => o.predictor_order = Some(int(k, v)?),
            "corrector_order" => o.corrector_order = Some(int(k, v)?),
            "simple_order_2" => o.simple_order_2 = Some(boolean(k, v)?),
            "order" if is_uni_pc => {
                // uni_pc's order is derived from the schedule; the manifest states the rule.
                if v.as_str() != Some("min(3, len(sigmas) - 2)") {
                    return Err(bad(k, v, "uni_pc only supports min(3, len(sigmas) - 2)"));
                }
            }
            "order" => o.order = Some(int(k, v)?),
            "solver_type" | "deis_mode" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| bad(k, v, "expected a string"))?
                    .to_string();
                if k == "solver_type" {
                    o.solver_type = Some(s);
                } else {
                    o.deis_mode = Some(s);
                }
            }
            // Options fixed by the sampler's name: accepted only with the value it implies.
            "use_pece" => {
                expect(k, v, &Value::Bool(sampler == Sampler::SaSolverPece))?;
            }
            "cfg_pp" => {
                expect(k, v, &Value::Bool(sampler.needs_uncond()))?;
            }
            // A custom callable cannot come from a file: only the built-in default (null).
            "tau_func" | "noise_scaler" => expect(k, v, &Value::Null)?,
            "variant" if is_uni_pc => expect(
                k,
                v,
                &Value::from(if sampler == Sampler::UniPc {
                    "bh1"
                } else {
                    "bh2"
                }),
            )?,
            "last_sigma_replaced_by" if is_uni_pc => expect(k, v, &Value::from(0.001))?,
            "lower_order_final" | "predict_x0" if is_uni_pc => expect(k, v, &Value::Bool(true))?,
            "thresholding" if is_uni_pc => expect(k, v, &Value::Bool(false))?,
            "method" if is_uni_pc => expect(k, v, &Value::from("multistep"))?,
            "model_type" if is_uni_pc => expect(k, v, &Value::from("noise"))?,
            _ => return Err(bad(k, v, "option not supported by this implementation")),
        }
    }
    Ok(o)
}

fn expect(k: &str, v: &Value, want: &Value) -> Result<(), String> {
    if v == want {
        Ok(())
    } else {
        Err(format!(
            "extra_options.{k} = {v}: this implementation only supports {want}"
        ))
    }
}

/// What the denoiser wrapper does at each call.
enum Mode {
    /// Evaluate the toy model and compare its output with the recording.
    Analytic(MixtureDenoiser),
    /// Return the recorded output.
    Replay,
}

/// A denoiser that checks every call against `call.NNN.*` of the golden file.
struct Checked<'f> {
    file: &'f GoldenFile,
    mode: Mode,
    calls: usize,
    stats: ErrorStats,
    x_tol: Tol,
    sigma_rel: f64,
}

impl Checked<'_> {
    fn tensor(&self, name: &str) -> Result<&[f64], SamplerError> {
        self.file
            .try_get(name)
            .map(|g| g.data.as_slice())
            .ok_or_else(|| SamplerError::Denoiser(format!("the reference has no tensor {name}")))
    }
}

impl<B: Backend> Denoiser<B> for Checked<'_> {
    fn denoise(
        &mut self,
        backend: &B,
        x: &Tensor<B>,
        sigma: f64,
        want_uncond: bool,
    ) -> flux_samplers::Result<Denoised<B>> {
        let i = self.calls;
        self.calls += 1;
        let p = format!("call.{i:03}");
        if self.file.try_get(&format!("{p}.x")).is_none() {
            return Err(SamplerError::Denoiser(format!(
                "model call {i} at sigma {sigma}: the reference made only {i} calls"
            )));
        }
        let host = backend.download_f64(x)?;
        let rx = self.tensor(&format!("{p}.x"))?.to_vec();
        let rs = self.tensor(&format!("{p}.sigma"))?.to_vec();
        let mut stats = std::mem::take(&mut self.stats);
        // The sigma first: a wrong sigma explains a wrong x, not the other way round.
        let ours = vec![sigma; rs.len()];
        stats.compare(&format!("{p}.sigma"), &ours, &rs, self.sigma_rel, 0.0);
        self.x_tol
            .compare(&mut stats, &format!("{p}.x"), &host, &rx);
        let result = match &mut self.mode {
            Mode::Analytic(m) => {
                let out = m.denoise(backend, x, sigma, want_uncond)?;
                let d = backend.download_f64(&out.denoised)?;
                let rd = self.tensor(&format!("{p}.denoised"))?;
                self.x_tol
                    .compare(&mut stats, &format!("{p}.denoised"), &d, rd);
                if let Some(u) = &out.uncond
                    && let Some(ru) = self.file.try_get(&format!("{p}.uncond_denoised"))
                {
                    let u = backend.download_f64(u)?;
                    self.x_tol
                        .compare(&mut stats, &format!("{p}.uncond_denoised"), &u, &ru.data);
                }
                out
            }
            Mode::Replay => {
                let up = |v: &[f64]| backend.upload(HostData::F64(v), x.shape(), x.dtype());
                let denoised = up(self.tensor(&format!("{p}.denoised"))?)?;
                let uncond = if want_uncond {
                    Some(up(self.tensor(&format!("{p}.uncond_denoised"))?)?)
                } else {
                    None
                };
                Denoised { denoised, uncond }
            }
        };
        self.stats = stats;
        Ok(result)
    }
}

/// The recorded noise draws `noise.NNN` with their `noise_sigma.NNN`.
fn recorded_draws(file: &GoldenFile) -> Result<Vec<RecordedDraw>, String> {
    let mut draws = Vec::new();
    for i in 0.. {
        let Some(n) = file.try_get(&format!("noise.{i:03}")) else {
            break;
        };
        let s = file
            .try_get(&format!("noise_sigma.{i:03}"))
            .ok_or_else(|| format!("noise.{i:03} has no noise_sigma.{i:03}"))?;
        if s.data.len() != 2 {
            return Err(format!("noise_sigma.{i:03} must hold 2 values"));
        }
        draws.push((n.data.clone(), [s.data[0], s.data[1]]));
    }
    Ok(draws)
}

fn run_case<B: Backend>(
    be: &B,
    folder: &Path,
    case: &Value,
    name: &str,
) -> Result<CaseResult, String> {
    let sampler_name = str_field(case, "sampler")?;
    let sampler = Sampler::from_str(sampler_name).map_err(|e| e.to_string())?;
    if !sampler.is_implemented() {
        return Ok(CaseResult::failed(
            name,
            &format!("{sampler} is not implemented"),
        ));
    }
    let file_name = str_field(case, "file")?;
    let file = GoldenFile::open(&folder.join(file_name)).map_err(|e| e.to_string())?;
    let f32_case = match case.get("dtype").and_then(Value::as_str).unwrap_or("f64") {
        "f64" => false,
        "f32" => true,
        other => {
            return Err(format!(
                "manifest `dtype` must be f64 or f32, got '{other}'"
            ));
        }
    };
    let dtype = if f32_case { DType::F32 } else { DType::F64 };
    let get = |n: &str| file.get(n).map_err(|e| e.to_string());
    let sigmas = get(if f32_case { "sigmas_f32" } else { "sigmas" })?
        .data
        .clone();
    let model = model_sampling(case)?;
    let options = sampler_options(sampler, case.get("extra_options").unwrap_or(&Value::Null))?;
    let x_init = get("x_init")?;
    let shape = x_init.shape.clone();
    let x = be
        .upload(HostData::F64(&x_init.data), &shape, dtype)
        .map_err(|e| e.to_string())?;

    let draws = recorded_draws(&file)?;
    let n_draws = usize_field(case, "n_noise_draws")?;
    if n_draws != draws.len() {
        return Err(format!(
            "manifest n_noise_draws is {n_draws} but the file holds {} noise tensors",
            draws.len()
        ));
    }
    let own_draws = draws
        .iter()
        .filter(|(_, s)| !(s[0].is_nan() && s[1].is_nan()))
        .count();
    let mut noise = ReplayNoise::new(shape.clone(), dtype, draws)
        .map_err(|e| e.to_string())?
        .without_global_draws()
        .with_tolerance(if f32_case || sampler == Sampler::DpmFast {
            1e-6
        } else {
            1e-12
        });

    let f32_coefficients = matches!(sampler, Sampler::Deis | Sampler::DpmFast);
    let (x_tol, out_tol) = if f32_case {
        let uni_pc = matches!(sampler, Sampler::UniPc | Sampler::UniPcBh2);
        let t = Tol {
            rel: 1e-5,
            abs: 0.0,
            scaled: true,
        };
        (
            t,
            Tol {
                rel: if uni_pc { 5e-5 } else { 1e-5 },
                ..t
            },
        )
    } else {
        let rel = if f32_coefficients { 1e-6 } else { 1e-10 };
        // Where the reference computes coefficients in float32, their error is relative to
        // the whole tensor, not to each (possibly tiny) element.
        let t = Tol {
            rel,
            abs: 1e-12,
            scaled: rel > 1e-10,
        };
        (t, t)
    };
    // Where the reference's coefficients are float32, the closed loop through the guided toy
    // model amplifies their rounding step after step; replaying the recorded model outputs
    // measures the sampler's own arithmetic instead (the model is checked by every other case).
    let mode = if f32_case || f32_coefficients {
        Mode::Replay
    } else {
        let cfg = f64_field(case, "cfg")?;
        Mode::Analytic(MixtureDenoiser::new(
            mixture(case, "mix_cond")?,
            mixture(case, "mix_uncond")?,
            cfg,
            model.is_flow(),
        ))
    };
    let mut den = Checked {
        file: &file,
        mode,
        calls: 0,
        stats: ErrorStats::default(),
        x_tol,
        sigma_rel: if f32_case || sampler == Sampler::DpmFast {
            1e-6
        } else {
            1e-12
        },
    };
    let result = {
        let mut ctx = SampleContext {
            backend: be,
            model: &model,
            denoiser: &mut den,
            noise: &mut noise,
            callback: None,
        };
        flux_samplers::sample(sampler, &mut ctx, x, &sigmas, &options)
    };
    let mut stats = std::mem::take(&mut den.stats);
    let out_raw = match result {
        Ok(t) => t,
        Err(e) => {
            stats.violation(format!("sampler failed: {e}"));
            return Ok(stats.finish(name));
        }
    };
    let n_calls = usize_field(case, "n_model_calls")?;
    if den.calls != n_calls {
        stats.violation(format!(
            "{} model calls, the reference made {n_calls}",
            den.calls
        ));
    }
    if noise.consumed() != own_draws {
        stats.violation(format!(
            "{} noise draws, the reference made {own_draws} from the sampler's noise source",
            noise.consumed()
        ));
    }
    let raw = be.download_f64(&out_raw).map_err(|e| e.to_string())?;
    out_tol.compare(&mut stats, "out_raw", &raw, &get("out_raw")?.data);
    let inv_sigma = f64_field(case, "inverse_noise_scaling_sigma")?;
    let c = model.inverse_noise_scaling_coeff(inv_sigma);
    let out = be
        .lincomb(&[(c, &out_raw)])
        .and_then(|t| be.download_f64(&t))
        .map_err(|e| e.to_string())?;
    out_tol.compare(&mut stats, "out", &out, &get("out")?.data);
    Ok(stats.finish(name))
}
