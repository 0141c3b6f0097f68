//! Parity of the torch-compatible CPU generator (`kind: "rng"`): `prepare_noise` draws
//! (`torch.randn(shape, generator=torch.manual_seed(seed))`) and successive draws of
//! ComfyUI's `default_noise_sampler`, compared bit for bit with the stored tensors.

use crate::RunOptions;
use crate::data::{DataError, GoldenFile, read_json};
use crate::report::{CaseResult, ErrorStats};
use flux_kernels::DType;
use flux_samplers::noise::{DefaultNoise, HostNoise, randn};
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
pub fn run(folder: &Path, opts: &RunOptions) -> Result<Vec<CaseResult>, DataError> {
    let _ = opts;
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
