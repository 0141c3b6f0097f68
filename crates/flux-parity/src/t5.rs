//! Parity of the T5 encoder (`t5-encoder` folders): the single case of the folder, float64
//! against the f64 goldens (output ~1e-10, intermediates at f32 rounding), the bucket tables,
//! and a float32 run within the README's tolerance.

use crate::data::{DataError, GoldenFile};
use crate::report::{CaseResult, ErrorStats};
use crate::vae::{
    F64_REL, check_rel_l2, compare_acts, compare_scaled, f64_field, open_folder, read_weights,
    source, usize_field,
};
use flux_kernels::{Backend, DType, Tensor};
use flux_model::t5::{T5Config, T5Encoder, relative_bucket};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// rel_l2 tolerance of a float32 run (README: T5/CLIP <= 5e-6).
pub const F32_REL_L2: f64 = 5e-6;

/// The encoder configuration from a reference `config.json`.
pub fn t5_config(cfg: &Value, path: &Path) -> Result<T5Config, DataError> {
    Ok(T5Config {
        vocab_size: usize_field(cfg, "vocab_size", path)?,
        d_model: usize_field(cfg, "d_model", path)?,
        d_kv: usize_field(cfg, "d_kv", path)?,
        d_ff: usize_field(cfg, "d_ff", path)?,
        num_layers: usize_field(cfg, "num_layers", path)?,
        num_heads: usize_field(cfg, "num_heads", path)?,
        num_buckets: usize_field(cfg, "relative_attention_num_buckets", path)?,
        max_distance: usize_field(cfg, "relative_attention_max_distance", path)?,
        eps: f64_field(cfg, "layer_norm_epsilon", path)?,
    })
}

/// Token ids of a golden `[batch, L]` integer tensor.
pub(crate) fn token_ids(golden: &GoldenFile, name: &str) -> Result<(Vec<u32>, usize), DataError> {
    let g = golden.get(name)?;
    let batch = g.shape.first().copied().unwrap_or(1);
    let ids = g
        .data
        .iter()
        .map(|&x| {
            if x >= 0.0 && x <= f64::from(u32::MAX) && x.fract() == 0.0 {
                Ok(x as u32)
            } else {
                Err(DataError::format(
                    golden.path(),
                    format!("{name}: {x} is not a token id"),
                ))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ids, batch))
}

fn check_buckets(stats: &mut ErrorStats, golden: &GoldenFile, cfg: &T5Config) {
    let Some(rel) = golden.try_get("rel_bucket.relative_position") else {
        return;
    };
    for (name, nb, md) in [
        ("rel_bucket.bucket", cfg.num_buckets, cfg.max_distance),
        ("rel_bucket.bucket_xxl", 32, 128),
    ] {
        if let Some(want) = golden.try_get(name) {
            let got: Vec<f64> = rel
                .data
                .iter()
                .map(|&r| relative_bucket(r as i64, nb, md) as f64)
                .collect();
            stats.compare(name, &got, &want.data, 0.0, 0.0);
        }
    }
}

/// Runs the case of a `t5-encoder` folder on `be`: one result with the f64 and f32 checks, or,
/// on a backend without f64, a skipped f64 result and the f32 result.
pub fn run<B: Backend>(be: &B, folder: &Path) -> Result<Vec<CaseResult>, DataError> {
    let mf = open_folder(folder)?;
    let cfg = t5_config(&mf.config, &folder.join("config.json"))?;
    let weights = read_weights(&mf.weights)?;
    let wpath = mf
        .weights
        .first()
        .cloned()
        .unwrap_or_else(|| folder.to_path_buf());
    let build = |dtype| -> Result<T5Encoder<B>, DataError> {
        let mut src = source(be, &weights, dtype, &wpath)?;
        T5Encoder::load(be, cfg.clone(), &mut src)
            .map_err(|e| DataError::format(&wpath, e.to_string()))
    };
    let golden = &mf.golden;
    let (ids, batch) = token_ids(golden, "in.input_ids")?;
    let kerr =
        |e: flux_model::tensor_source::NetError| DataError::format(golden.path(), e.to_string());
    let dl = |t: &Tensor<B>| be.download_f64(t).map_err(|e| kerr(e.into()));
    let want = &golden.get("f64.last_hidden_state")?.data;
    let mut stats = ErrorStats::default();
    check_buckets(&mut stats, golden, &cfg);

    let mut out = Vec::new();
    let mut n_acts = None;
    if be.supports_dtype(DType::F64) {
        let enc64 = build(DType::F64)?;
        let mut acts = BTreeMap::new();
        let out64 = enc64
            .forward_traced(be, &ids, batch, DType::F64, &mut |n, t| {
                if let Ok(v) = be.download_f64(t) {
                    acts.insert(n.to_string(), v);
                }
            })
            .map_err(kerr)?;
        compare_scaled(
            &mut stats,
            "f64.last_hidden_state",
            &dl(&out64)?,
            want,
            F64_REL,
        );
        let n = compare_acts(&mut stats, golden, "", &acts);
        if n == 0 {
            stats.violation("no intermediate activation was compared".into());
        }
        n_acts = Some(n);
    } else {
        out.push(CaseResult::skipped(
            "t5/last_hidden_state f64",
            &format!("needs f64; backend {} has no f64", be.name()),
        ));
    }

    let enc32 = build(DType::F32)?;
    let out32 = dl(&enc32.forward(be, &ids, batch, DType::F32).map_err(kerr)?)?;
    let e = check_rel_l2(
        &mut stats,
        "f32 last_hidden_state",
        &out32,
        want,
        F32_REL_L2,
    );
    let label = if n_acts.is_some() {
        "t5/last_hidden_state"
    } else {
        "t5/last_hidden_state f32"
    };
    let mut r = stats.finish(label);
    if r.passed() {
        r.detail = match n_acts {
            Some(n) => format!("{n} intermediates; f32 rel_l2 {e:.2e}"),
            None => format!("f32 rel_l2 {e:.2e}"),
        };
    }
    out.push(r);
    Ok(out)
}
