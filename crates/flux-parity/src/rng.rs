//! Parity of the torch-compatible CPU generator (`kind: "rng"`): `prepare_noise` draws
//! (`torch.randn(shape, generator=torch.manual_seed(seed))`) and successive draws of
//! ComfyUI's `default_noise_sampler`, compared bit for bit with the stored tensors.

use crate::data::{DataError, GoldenFile, read_json};
use crate::report::{CaseResult, ErrorStats};
use flux_kernels::{Cpu, DType};
use flux_samplers::NoiseSource;
use flux_samplers::noise::{BrownianTreeNoise, DefaultNoise, HostNoise, randn};
use serde_json::Value;
use std::path::Path;

/// One manifest entry.
struct Case {
    tensor: String,
    kind: String,
    seed: u64,
    generator_seed: Option<u64>,
    shape: Vec<usize>,
    dtype: DType,
    draw: usize,
}

fn field<'a>(v: &'a Value, name: &str, i: usize, path: &Path) -> Result<&'a Value, DataError> {
    v.get(name)
        .ok_or_else(|| DataError::format(path, format!("case {i}: missing field `{name}`")))
}

fn as_u64(v: &Value, name: &str, i: usize, path: &Path) -> Result<u64, DataError> {
    v.as_u64().ok_or_else(|| {
        DataError::format(
            path,
            format!("case {i}: `{name}` must be a non-negative integer, got {v}"),
        )
    })
}

fn parse_case(v: &Value, i: usize, path: &Path) -> Result<Case, DataError> {
    let text = |name: &str| -> Result<String, DataError> {
        field(v, name, i, path)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| DataError::format(path, format!("case {i}: `{name}` must be a string")))
    };
    let tensor = text("tensor")?;
    let kind = text("kind")?;
    let dtype_name = text("dtype")?;
    let dtype: DType = dtype_name
        .parse()
        .map_err(|e: String| DataError::format(path, format!("case {i} ({tensor}): {e}")))?;
    let seed = as_u64(field(v, "seed", i, path)?, "seed", i, path)?;
    let generator_seed = v
        .get("generator_seed")
        .map(|g| as_u64(g, "generator_seed", i, path))
        .transpose()?;
    let shape = field(v, "shape", i, path)?
        .as_array()
        .ok_or_else(|| DataError::format(path, format!("case {i}: `shape` must be an array")))?
        .iter()
        .map(|d| as_u64(d, "shape", i, path).map(|d| d as usize))
        .collect::<Result<Vec<_>, _>>()?;
    let draw = v
        .get("draw")
        .map(|d| as_u64(d, "draw", i, path))
        .transpose()?
        .unwrap_or(0) as usize;
    Ok(Case {
        tensor,
        kind,
        seed,
        generator_seed,
        shape,
        dtype,
        draw,
    })
}

/// Runs every case of an `rng` folder.
pub fn run(folder: &Path) -> Result<Vec<CaseResult>, DataError> {
    let manifest_path = folder.join("manifest.json");
    let manifest = read_json(&manifest_path)?;
    let file = manifest
        .get("file")
        .and_then(Value::as_str)
        .unwrap_or("rng.safetensors");
    let golden = GoldenFile::open(&folder.join(file))?;
    let cases = manifest
        .get("cases")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(&manifest_path, "`cases` must be an array"))?;
    let cases = cases
        .iter()
        .enumerate()
        .map(|(i, v)| parse_case(v, i, &manifest_path))
        .collect::<Result<Vec<_>, _>>()?;

    let mut results = Vec::with_capacity(cases.len());
    for case in &cases {
        let actual = match case.kind.as_str() {
            "prepare_noise" => randn(&case.shape, case.seed, case.dtype).map(|v| v.to_f64()),
            "default_noise_sampler" => {
                // Draw `draw` is the last of `draw + 1` successive draws of one source.
                let mut source = match case.generator_seed {
                    Some(g) => DefaultNoise::with_generator_seed(g),
                    None => DefaultNoise::new(case.seed),
                };
                (0..=case.draw)
                    .map(|_| source.next_host(&case.shape, case.dtype))
                    .last()
                    .unwrap_or_else(|| Ok(HostNoise::F64(Vec::new())))
                    .map(|v| v.to_f64())
            }
            other => {
                results.push(CaseResult::failed(
                    &case.tensor,
                    &format!("unknown rng case kind '{other}'"),
                ));
                continue;
            }
        };
        let reference = match golden.get(&case.tensor) {
            Ok(g) => g,
            Err(e) => {
                results.push(CaseResult::failed(&case.tensor, &e.to_string()));
                continue;
            }
        };
        let mut stats = ErrorStats::default();
        if reference.shape != case.shape {
            stats.violation(format!(
                "stored shape {:?}, manifest says {:?}",
                reference.shape, case.shape
            ));
        }
        match actual {
            Ok(values) => stats.compare(&case.tensor, &values, &reference.data, 0.0, 0.0),
            Err(e) => stats.violation(e.to_string()),
        }
        results.push(stats.finish(&case.tensor));
    }
    Ok(results)
}

/// Checks the Brownian-tree noise against every sampler case of `folder` (a `samplers`
/// reference folder) whose only noise source is `brownian_tree`: each recorded `noise.NNN`
/// must be what [`BrownianTreeNoise`] draws for the recorded `noise_sigma.NNN`, with the tree
/// over the schedule's smallest positive and largest sigma and entropy
/// `noise_seed_used.brownian_tree`. Values must agree to two ulps of the case's dtype. The
/// draws are made twice: as recorded, and with the tightest promise before each one that the
/// later draws keep ([`NoiseSource::promise_below`]), under which the tree keeps less.
pub fn run_brownian(folder: &Path) -> Result<Vec<CaseResult>, DataError> {
    let manifest_path = folder.join("manifest.json");
    let manifest = read_json(&manifest_path)?;
    let cases = manifest
        .get("cases")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(&manifest_path, "`cases` must be an array"))?;
    let mut results = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if !uses_only_brownian(case) {
            continue;
        }
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        results.push(
            check_brownian_case(folder, case, i, &manifest_path)
                .unwrap_or_else(|e| CaseResult::failed(&name, &e.to_string())),
        );
    }
    Ok(results)
}

/// Whether a sampler case draws all its noise from the Brownian tree.
pub fn uses_only_brownian(case: &Value) -> bool {
    case.get("noise_sources")
        .and_then(Value::as_array)
        .is_some_and(|s| s.len() == 1 && s[0].as_str() == Some("brownian_tree"))
}

fn check_brownian_case(
    folder: &Path,
    case: &Value,
    i: usize,
    manifest_path: &Path,
) -> Result<CaseResult, DataError> {
    let text = |name: &str| -> Result<&str, DataError> {
        field(case, name, i, manifest_path)?
            .as_str()
            .ok_or_else(|| {
                DataError::format(
                    manifest_path,
                    format!("case {i}: `{name}` must be a string"),
                )
            })
    };
    let name = &format!("{} (brownian tree)", text("name")?);
    let file = text("file")?;
    let dtype: DType = text("dtype")?
        .parse()
        .map_err(|e: String| DataError::format(manifest_path, format!("case {i}: {e}")))?;
    let seed = as_u64(
        field(
            field(case, "noise_seed_used", i, manifest_path)?,
            "brownian_tree",
            i,
            manifest_path,
        )?,
        "noise_seed_used.brownian_tree",
        i,
        manifest_path,
    )?;
    let shape = field(case, "shape", i, manifest_path)?
        .as_array()
        .ok_or_else(|| {
            DataError::format(manifest_path, format!("case {i}: `shape` must be an array"))
        })?
        .iter()
        .map(|d| as_u64(d, "shape", i, manifest_path).map(|d| d as usize))
        .collect::<Result<Vec<_>, _>>()?;
    let golden = GoldenFile::open(&folder.join(file))?;
    let sigmas = &golden.get("sigmas")?.data;
    // The tree itself is reproduced bit for bit; the divisor sqrt(|dt|) of the reference can be
    // one ulp lower (its sqrt is not correctly rounded: it rounds the other way when the exact
    // root lies within about 0.01 ulp of a rounding midpoint), which moves the quotient by up
    // to two ulps. Measured: at most 4.3e-16 (f64) and 1.3e-7 (f32) relative.
    let two_ulp = if dtype == DType::F32 {
        2.0 * f64::from(f32::EPSILON)
    } else {
        2.0 * f64::EPSILON
    };
    let mut stats = ErrorStats::default();
    let mut draws = Vec::new();
    while let Some(noise) = golden.try_get(&format!("noise.{:03}", draws.len())) {
        let n = draws.len();
        let pair = golden.get(&format!("noise_sigma.{n:03}"))?;
        let (Some(&s0), Some(&s1)) = (pair.data.first(), pair.data.get(1)) else {
            stats.violation(format!("noise_sigma.{n:03} has fewer than two values"));
            break;
        };
        draws.push((noise, s0, s1));
    }
    if draws.is_empty() {
        stats.violation("no recorded noise draws".into());
    }
    // Once as recorded, once with the tightest promise before each draw that the later draws
    // keep (the highest sigma any of them reaches): the tree then keeps only what they need,
    // and must still draw the same values.
    let promises: Vec<Option<f64>> = (0..draws.len())
        .map(|n| {
            draws[n + 1..]
                .iter()
                .map(|&(_, s0, s1)| s0.max(s1))
                .reduce(f64::max)
        })
        .collect();
    for promised in [false, true] {
        let mut source = match BrownianTreeNoise::for_schedule(seed, sigmas) {
            Ok(s) => s,
            Err(e) => return Ok(CaseResult::failed(name, &e.to_string())),
        };
        let label = if promised { " (promised)" } else { "" };
        for (n, (&(noise, s0, s1), promise)) in draws.iter().zip(&promises).enumerate() {
            if promised && let Some(p) = *promise {
                NoiseSource::<Cpu>::promise_below(&mut source, p);
            }
            match source.draw(&shape, dtype, s0, s1) {
                Ok(v) => stats.compare(
                    &format!("noise.{n:03}{label}"),
                    &v,
                    &noise.data,
                    two_ulp,
                    0.0,
                ),
                Err(e) => stats.violation(format!("noise.{n:03}{label}: {e}")),
            }
        }
    }
    Ok(stats.finish(name))
}
