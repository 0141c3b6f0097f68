//! Sigma schedulers against ComfyUI: every tensor of every `schedulers_<model>.safetensors` the
//! folder's manifest lists, plus each file's `model_sampling.sigmas` table.
//!
//! Values are compared as float32 bit patterns. Schedulers made only of IEEE arithmetic must be
//! bit-exact; those ending in a float32 transcendental that PyTorch evaluates with its own CPU
//! kernels rather than the platform libm (`karras`, `exponential`, `kl_optimal`, and `normal` /
//! `sgm_uniform` on a discrete model) may differ by up to 2 ulps (see the `flux-schedulers`
//! crate docs). NaN matches NaN only (`kl_optimal` with one step is `[NaN, 0]` in ComfyUI).

use crate::data::{DataError, GoldenFile, read_json};
use crate::report::{CaseResult, ErrorStats};
use flux_samplers::Sampler;
use flux_schedulers::{ModelSampling, Scheduler, calculate_sigmas, ksampler_sigmas};
use serde_json::Value;
use std::path::Path;

/// Whether ComfyUI's KSampler discards the penultimate sigma for `sampler` (used when an entry
/// does not say); unknown names do not.
fn discards_penultimate(sampler: &str) -> bool {
    sampler
        .parse::<Sampler>()
        .is_ok_and(Sampler::discards_penultimate_sigma)
}

/// The ulp allowance of a scheduler on a model (0: bit-exact).
pub fn allowed_ulps(scheduler: Scheduler, model: &ModelSampling) -> u32 {
    match scheduler {
        Scheduler::Karras | Scheduler::Exponential | Scheduler::KlOptimal => 2,
        Scheduler::Normal | Scheduler::SgmUniform if !model.is_flow() => 2,
        _ => 0,
    }
}

/// Distance in units in the last place between two finite f32 values (0 when equal, including
/// +0 and -0).
pub fn ulp_distance(a: f32, b: f32) -> u64 {
    fn ordered(x: f32) -> i64 {
        let bits = i64::from(x.to_bits().cast_signed());
        if bits < 0 {
            i64::from(i32::MIN) - bits
        } else {
            bits
        }
    }
    ordered(a).abs_diff(ordered(b))
}

/// One entry of the manifest: which schedule a tensor holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Tensor name in the file.
    pub tensor: String,
    /// The scheduler.
    pub scheduler: Scheduler,
    /// Steps requested.
    pub steps: usize,
    /// Denoise strength (KSampler path only).
    pub denoise: f64,
    /// The sampler of the KSampler path, `None` for a plain `calculate_sigmas` call.
    pub sampler: Option<String>,
    /// Whether the KSampler path discards the penultimate sigma.
    pub discard_penultimate: bool,
}

/// Parses a tensor name `<scheduler>.steps<N>` or `<scheduler>.steps<N>.denoise<D>.<sampler>`
/// (`D` written with `p` for the decimal point, e.g. `denoise0p75`).
pub fn parse_tensor_name(name: &str) -> Option<Entry> {
    let mut parts = name.splitn(4, '.');
    let scheduler: Scheduler = parts.next()?.parse().ok()?;
    let steps = parts.next()?.strip_prefix("steps")?.parse().ok()?;
    let (denoise, sampler) = match (parts.next(), parts.next()) {
        (None, None) => (1.0, None),
        (Some(d), Some(s)) => (
            d.strip_prefix("denoise")?.replace('p', ".").parse().ok()?,
            Some(s.to_string()),
        ),
        _ => return None,
    };
    let discard_penultimate = sampler.as_deref().is_some_and(discards_penultimate);
    Some(Entry {
        tensor: name.to_string(),
        scheduler,
        steps,
        denoise,
        sampler,
        discard_penultimate,
    })
}

/// Reads one manifest entry; fields it lacks are taken from the tensor name.
fn entry_of(manifest: &Path, v: &Value) -> Result<Entry, DataError> {
    let tensor = v
        .get("tensor")
        .and_then(Value::as_str)
        .ok_or_else(|| DataError::format(manifest, "schedulers entry without `tensor`"))?;
    let bad = |what: &str| DataError::format(manifest, format!("entry {tensor}: {what}"));
    let mut e = parse_tensor_name(tensor).unwrap_or(Entry {
        tensor: tensor.to_string(),
        scheduler: Scheduler::Normal,
        steps: usize::MAX,
        denoise: 1.0,
        sampler: None,
        discard_penultimate: false,
    });
    if let Some(s) = v.get("scheduler").and_then(Value::as_str) {
        e.scheduler = s.parse().map_err(|err| bad(&format!("{err}")))?;
    } else if e.steps == usize::MAX {
        return Err(bad(
            "no `scheduler` and the tensor name is not <scheduler>.steps<N>",
        ));
    }
    if let Some(n) = v.get("steps") {
        e.steps = n
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad("`steps` is not a non-negative integer"))?;
    } else if e.steps == usize::MAX {
        return Err(bad("no `steps`"));
    }
    match v.get("sampler") {
        Some(Value::Null) => e.sampler = None,
        Some(Value::String(s)) => e.sampler = Some(s.clone()),
        Some(_) => return Err(bad("`sampler` is neither null nor a string")),
        None => {}
    }
    if let Some(d) = v.get("denoise") {
        e.denoise = d.as_f64().ok_or_else(|| bad("`denoise` is not a number"))?;
    }
    e.discard_penultimate = match v.get("discard_penultimate") {
        Some(b) => b
            .as_bool()
            .ok_or_else(|| bad("`discard_penultimate` is not a boolean"))?,
        None => e.sampler.as_deref().is_some_and(discards_penultimate),
    };
    Ok(e)
}

/// The model sampling a manifest case describes.
fn model_of(manifest: &Path, case: &Value) -> Result<ModelSampling, DataError> {
    let ms = case
        .get("model_sampling")
        .ok_or_else(|| DataError::format(manifest, "schedulers case without `model_sampling`"))?;
    let kind = ms.get("type").and_then(Value::as_str).unwrap_or("");
    let num = |k: &str| ms.get(k).and_then(Value::as_f64);
    if kind.starts_with("ModelSamplingFlux") {
        let shift = num("shift")
            .ok_or_else(|| DataError::format(manifest, "ModelSamplingFlux without `shift`"))?;
        let timesteps = num("timesteps").unwrap_or(10_000.0);
        if timesteps != 10_000.0 {
            return Err(DataError::format(
                manifest,
                format!("ModelSamplingFlux with {timesteps} timesteps (10000 supported)"),
            ));
        }
        return Ok(ModelSampling::flux(shift));
    }
    if kind.starts_with("ModelSamplingDiscrete") {
        let schedule = ms.get("beta_schedule").and_then(Value::as_str);
        let standard = matches!(schedule, None | Some("linear"))
            && num("linear_start").is_none_or(|v| v == 0.00085)
            && num("linear_end").is_none_or(|v| v == 0.012)
            && num("timesteps").is_none_or(|v| v == 1000.0);
        if !standard {
            return Err(DataError::format(
                manifest,
                "ModelSamplingDiscrete other than SD 1.x's linear 0.00085..0.012 x1000",
            ));
        }
        return Ok(ModelSampling::sd15());
    }
    Err(DataError::format(
        manifest,
        format!("unsupported model_sampling type '{kind}'"),
    ))
}

/// Compares f32 values bit for bit, allowing `ulps`; returns the case result.
fn compare(name: &str, actual: &[f32], reference: &[f64], ulps: u32) -> CaseResult {
    let mut stats = ErrorStats::default();
    let widened: Vec<f64> = actual.iter().map(|&x| f64::from(x)).collect();
    // NaN pairing and length; the ulp test below is the real tolerance.
    stats.compare("sigmas", &widened, reference, f64::INFINITY, 0.0);
    let mut max_ulps = 0u64;
    let mut differing = 0usize;
    if actual.len() == reference.len() {
        for (i, (&a, &r)) in actual.iter().zip(reference).enumerate() {
            let r32 = r as f32;
            if a.is_nan() || r32.is_nan() {
                continue;
            }
            let d = ulp_distance(a, r32);
            if d > 0 {
                differing += 1;
            }
            max_ulps = max_ulps.max(d);
            if d > u64::from(ulps) {
                stats.violation(format!(
                    "sigmas[{i}]: {a:e} vs reference {r32:e} ({d} ulps, {ulps} allowed)"
                ));
            }
        }
    }
    let mut result = stats.finish(name);
    if result.passed() {
        result.detail = if differing == 0 {
            format!("bit-exact, {} values", actual.len())
        } else {
            format!(
                "{differing} of {} values within {max_ulps} ulp (allowance {ulps})",
                actual.len()
            )
        };
    }
    result
}

/// Runs every case of a `schedulers` folder.
pub fn run(folder: &Path) -> Result<Vec<CaseResult>, DataError> {
    let manifest_path = folder.join("manifest.json");
    let manifest = read_json(&manifest_path)?;
    let cases = manifest
        .get("cases")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(&manifest_path, "no `cases` array"))?;
    let mut results = Vec::new();
    for case in cases {
        let file = case
            .get("file")
            .and_then(Value::as_str)
            .ok_or_else(|| DataError::format(&manifest_path, "case without `file`"))?;
        let label = case.get("model").and_then(Value::as_str).unwrap_or(file);
        let entries = case
            .get("entries")
            .and_then(Value::as_array)
            .ok_or_else(|| DataError::format(&manifest_path, format!("{file}: no `entries`")))?;
        let model = model_of(&manifest_path, case)?;
        let golden = GoldenFile::open(&folder.join(file))?;

        let table_name = format!("schedulers/{label}/model_sampling.sigmas");
        results.push(match golden.try_get("model_sampling.sigmas") {
            Some(t) => compare(&table_name, model.table(), &t.data, 0),
            None => CaseResult::failed(&table_name, &format!("{file}: missing tensor")),
        });

        for v in entries {
            let e = entry_of(&manifest_path, v)?;
            let name = format!("schedulers/{label}/{}", e.tensor);
            let Some(reference) = golden.try_get(&e.tensor) else {
                results.push(CaseResult::failed(
                    &name,
                    &format!("{file}: missing tensor"),
                ));
                continue;
            };
            let actual = if e.sampler.is_some() {
                ksampler_sigmas(
                    e.scheduler,
                    &model,
                    e.steps,
                    e.denoise,
                    e.discard_penultimate,
                )
            } else {
                calculate_sigmas(e.scheduler, &model, e.steps)
            };
            results.push(match actual {
                Ok(a) => compare(
                    &name,
                    &a,
                    &reference.data,
                    allowed_ulps(e.scheduler, &model),
                ),
                Err(err) => CaseResult::failed(&name, &err.to_string()),
            });
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulp_distance_counts_representable_steps() {
        assert_eq!(ulp_distance(1.0, 1.0), 0);
        assert_eq!(ulp_distance(0.0, -0.0), 0);
        assert_eq!(ulp_distance(1.0, f32::from_bits(1.0f32.to_bits() + 2)), 2);
        assert_eq!(
            ulp_distance(-f32::MIN_POSITIVE, f32::MIN_POSITIVE),
            2 * (1 << 23)
        );
    }

    #[test]
    fn tensor_names_parse() {
        let e = parse_tensor_name("karras.steps10.denoise0p75.dpm_2").unwrap();
        assert_eq!(e.scheduler, Scheduler::Karras);
        assert_eq!(e.steps, 10);
        assert_eq!(e.denoise, 0.75);
        assert_eq!(e.sampler.as_deref(), Some("dpm_2"));
        assert!(e.discard_penultimate);
        let e = parse_tensor_name("sgm_uniform.steps3").unwrap();
        assert_eq!(
            (e.scheduler, e.steps, e.sampler),
            (Scheduler::SgmUniform, 3, None)
        );
        assert!(parse_tensor_name("bogus.steps3").is_none());
        assert!(parse_tensor_name("simple.steps3.denoise0p5").is_none());
    }
}
