//! Parity of the CLIP text model (`clip-text` folders): the single case of the folder, float64
//! against the f64 goldens (outputs ~1e-10, intermediates at f32 rounding), the pooled row's
//! index, and a float32 run within the README's tolerance.

use crate::data::{DataError, GoldenFile};
use crate::report::{CaseResult, ErrorStats};
use crate::t5::{F32_REL_L2, token_ids};
use crate::vae::{
    check_rel_l2, compare_acts, compare_scaled, f64_field, open_folder, read_weights, source,
    usize_field,
};
use flux_kernels::{Backend, DType, Tensor};
use flux_model::clip::{ClipConfig, ClipTextModel, end_token_index};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Tolerance of the float64 outputs, relative to the tensor's largest value. Looser than the
/// other models' 1e-10 because the reference computes the attention softmax in float32 even in
/// its float64 run (transformers' eager attention: `softmax(..., dtype=float32)`), which the model
/// reproduces; what remains is ulp-level float32 rounding inside that softmax (measured
/// 7.2e-8 on the hidden state, 6.6e-9 on the pooled vector).
pub const F64_REL_CLIP: f64 = 1.5e-7;

/// The text-model configuration from a reference `config.json`.
pub fn clip_config(cfg: &Value, path: &Path) -> Result<ClipConfig, DataError> {
    Ok(ClipConfig {
        vocab_size: usize_field(cfg, "vocab_size", path)?,
        hidden_size: usize_field(cfg, "hidden_size", path)?,
        intermediate_size: usize_field(cfg, "intermediate_size", path)?,
        num_layers: usize_field(cfg, "num_hidden_layers", path)?,
        num_heads: usize_field(cfg, "num_attention_heads", path)?,
        max_positions: usize_field(cfg, "max_position_embeddings", path)?,
        eps: f64_field(cfg, "layer_norm_eps", path)?,
    })
}

fn check_eos(stats: &mut ErrorStats, golden: &GoldenFile, ids: &[u32], batch: usize) {
    if let Some(g) = golden.try_get("eos_index") {
        let len = ids.len() / batch.max(1);
        let got: Vec<f64> = ids
            .chunks_exact(len.max(1))
            .map(|r| end_token_index(r) as f64)
            .collect();
        stats.compare("eos_index", &got, &g.data, 0.0, 0.0);
    }
}

/// Runs the case of a `clip-text` folder on `be`: one result with the f64 and f32 checks, or,
/// on a backend without f64, a skipped f64 result and the f32 result.
pub fn run<B: Backend>(be: &B, folder: &Path) -> Result<Vec<CaseResult>, DataError> {
    let mf = open_folder(folder)?;
    let cfg = clip_config(&mf.config, &folder.join("config.json"))?;
    let weights = read_weights(&mf.weights)?;
    let wpath = mf
        .weights
        .first()
        .cloned()
        .unwrap_or_else(|| folder.to_path_buf());
    let build = |dtype| -> Result<ClipTextModel<B>, DataError> {
        let mut src = source(be, &weights, dtype, &wpath)?;
        ClipTextModel::load(cfg.clone(), &mut src)
            .map_err(|e| DataError::format(&wpath, e.to_string()))
    };
    let golden = &mf.golden;
    let (ids, batch) = token_ids(golden, "in.input_ids")?;
    let kerr =
        |e: flux_model::tensor_source::NetError| DataError::format(golden.path(), e.to_string());
    let dl = |t: &Tensor<B>| be.download_f64(t).map_err(|e| kerr(e.into()));
    let want_h = &golden.get("f64.last_hidden_state")?.data;
    let want_p = &golden.get("f64.pooler_output")?.data;
    let mut stats = ErrorStats::default();
    check_eos(&mut stats, golden, &ids, batch);

    let mut out = Vec::new();
    let mut n_acts = None;
    if be.supports_dtype(DType::F64) {
        let m64 = build(DType::F64)?;
        let mut acts = BTreeMap::new();
        let o64 = m64
            .forward_traced(be, &ids, batch, DType::F64, &mut |n, t| {
                if let Ok(v) = be.download_f64(t) {
                    acts.insert(n.to_string(), v);
                }
            })
            .map_err(kerr)?;
        compare_scaled(
            &mut stats,
            "f64.last_hidden_state",
            &dl(&o64.last_hidden_state)?,
            want_h,
            F64_REL_CLIP,
        );
        compare_scaled(
            &mut stats,
            "f64.pooler_output",
            &dl(&o64.pooled)?,
            want_p,
            F64_REL_CLIP,
        );
        let n = compare_acts(&mut stats, golden, "", &acts);
        if n == 0 {
            stats.violation("no intermediate activation was compared".into());
        }
        n_acts = Some(n);
    } else {
        out.push(CaseResult::skipped(
            "clip/text_model f64",
            &format!("needs f64; backend {} has no f64", be.name()),
        ));
    }

    let m32 = build(DType::F32)?;
    let o32 = m32.forward(be, &ids, batch, DType::F32).map_err(kerr)?;
    let eh = check_rel_l2(
        &mut stats,
        "f32 last_hidden_state",
        &dl(&o32.last_hidden_state)?,
        want_h,
        F32_REL_L2,
    );
    let ep = check_rel_l2(
        &mut stats,
        "f32 pooler_output",
        &dl(&o32.pooled)?,
        want_p,
        F32_REL_L2,
    );
    let label = if n_acts.is_some() {
        "clip/text_model"
    } else {
        "clip/text_model f32"
    };
    let mut r = stats.finish(label);
    if r.passed() {
        let f32 = format!("f32 rel_l2 hidden {eh:.2e}, pooled {ep:.2e}");
        r.detail = match n_acts {
            Some(n) => format!("{n} intermediates; {f32}"),
            None => f32,
        };
    }
    out.push(r);
    Ok(out)
}
