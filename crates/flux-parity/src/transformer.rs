//! Parity of the Flux transformer (`kind: "flux-transformer"`): every case of the folder's
//! `config.json`, run in f64 (against `f64.out` and the stored `act.*` intermediates), in f32
//! (against `f64.out`, relative L2) and with the bf16 weights where the folder has them (against
//! `bf16w_f64.out`).

use crate::data::{DataError, Golden, GoldenFile, read_json};
use crate::report::{CaseResult, ErrorStats};
use flux_kernels::{Backend, DType, HostData, Tensor};
use flux_model::transformer::{FluxInputs, FluxTransformer};
use flux_model::weights::Weights;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// Relative L2 tolerance of an f32 run against the f64 goldens (README, flux-tiny).
pub const F32_REL_L2: f64 = 1e-4;
/// Elementwise tolerance of the f64 run against the f64 goldens.
pub const F64_REL: f64 = 1e-9;
/// Absolute floor of the f64 comparison (outputs have a standard deviation of about 1).
pub const F64_ABS: f64 = 1e-10;
/// Tolerance against intermediates stored rounded to f32 (a few f32 ulps).
pub const ACT_REL: f64 = 1e-6;

/// `||a - b|| / ||b||`.
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Case names listed in a transformer folder's `config.json`.
pub fn case_names(folder: &Path) -> Result<Vec<String>, DataError> {
    let manifest = read_json(&folder.join("manifest.json"))?;
    let cfg_name = manifest
        .get("config")
        .and_then(Value::as_str)
        .unwrap_or("config.json");
    let cfg_path = folder.join(cfg_name);
    let cfg = read_json(&cfg_path)?;
    let cases = cfg
        .get("cases")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(&cfg_path, "missing `cases` array"))?;
    cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| DataError::format(&cfg_path, format!("case {i}: missing `name`")))
        })
        .collect()
}

fn weight_files(folder: &Path) -> Result<Vec<String>, DataError> {
    let path = folder.join("manifest.json");
    let manifest = read_json(&path)?;
    let files = manifest
        .get("weights")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(&path, "missing `weights` list"))?;
    Ok(files
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect())
}

fn load<B: Backend>(be: &B, path: &Path, dtype: DType) -> Result<FluxTransformer<B>, DataError> {
    let w = Weights::open(path).map_err(|e| DataError::format(path, e.to_string()))?;
    FluxTransformer::load(be, &w, dtype).map_err(|e| DataError::format(path, e.to_string()))
}

/// Inputs of one case, uploaded in `dtype`.
struct CaseInputs {
    img: Golden,
    txt: Golden,
    y: Golden,
    img_ids: Vec<f64>,
    txt_ids: Vec<f64>,
    timesteps: Vec<f64>,
    guidance: Option<Vec<f64>>,
}

fn inputs(g: &GoldenFile, case: &str) -> Result<CaseInputs, DataError> {
    let get = |n: &str| g.get(&format!("{case}.in.{n}")).cloned();
    Ok(CaseInputs {
        img: get("img")?,
        txt: get("txt")?,
        y: get("y")?,
        img_ids: get("img_ids")?.data,
        txt_ids: get("txt_ids")?.data,
        timesteps: get("timesteps")?.data,
        guidance: g
            .try_get(&format!("{case}.in.guidance"))
            .map(|t| t.data.clone()),
    })
}

fn up<B: Backend>(be: &B, t: &Golden, dtype: DType) -> Result<Tensor<B>, DataError> {
    be.upload(HostData::F64(&t.data), &t.shape, dtype)
        .map_err(|e| DataError::Format {
            path: "input".into(),
            message: e.to_string(),
        })
}

/// The output and the named intermediates of one run, as f64.
pub type RunOutput = (Vec<f64>, HashMap<String, Vec<f64>>);

/// Runs `model` on a case; returns the output and the tapped intermediates (as f64).
pub fn run_model<B: Backend>(
    be: &B,
    model: &FluxTransformer<B>,
    g: &GoldenFile,
    case: &str,
) -> Result<RunOutput, DataError> {
    let ci = inputs(g, case)?;
    let dt = model.dtype();
    let (img, txt, y) = (
        up(be, &ci.img, dt)?,
        up(be, &ci.txt, dt)?,
        up(be, &ci.y, dt)?,
    );
    let inp = FluxInputs {
        img: &img,
        img_ids: &ci.img_ids,
        txt: &txt,
        txt_ids: &ci.txt_ids,
        timesteps: &ci.timesteps,
        y: &y,
        guidance: ci.guidance.as_deref(),
    };
    let mut acts = HashMap::new();
    let out = model
        .forward_tapped(be, &inp, &mut |name, t| {
            if let Ok(v) = be.download_f64(t) {
                acts.insert(name.to_string(), v);
            }
        })
        .map_err(|e| DataError::format(g.path(), format!("{case}: forward failed: {e}")))?;
    let v = be
        .download_f64(&out)
        .map_err(|e| DataError::format(g.path(), e.to_string()))?;
    Ok((v, acts))
}

/// The reference `pe` layout `[.., D/2, 2, 2]` (rotation matrices) from `(cos, sin)` pairs.
fn pe_as_matrices(cs: &[f64]) -> Vec<f64> {
    cs.chunks_exact(2)
        .flat_map(|p| [p[0], -p[1], p[1], p[0]])
        .collect()
}

fn check_f64<B: Backend>(
    be: &B,
    model: &FluxTransformer<B>,
    g: &GoldenFile,
    case: &str,
) -> Result<CaseResult, DataError> {
    let (out, acts) = run_model(be, model, g, case)?;
    let mut st = ErrorStats::default();
    st.compare(
        "out",
        &out,
        &g.get(&format!("{case}.f64.out"))?.data,
        F64_REL,
        F64_ABS,
    );
    let mut n_acts = 0;
    let prefix = format!("{case}.act.");
    for name in g.names() {
        let Some(act) = name.strip_prefix(&prefix) else {
            continue;
        };
        let reference = &g.get(name)?.data;
        let Some(mine) = acts.get(act) else {
            st.violation(format!("intermediate {act} was not produced"));
            continue;
        };
        let mine = if act == "pe" {
            pe_as_matrices(mine)
        } else {
            mine.clone()
        };
        // Stored rounded to f32: compare at that rounding level, relative to the tensor's scale.
        let scale = reference
            .iter()
            .fold(0f64, |m, v| m.max(v.abs()))
            .max(1e-30);
        st.compare(
            &format!("act.{act}"),
            &mine,
            reference,
            ACT_REL,
            ACT_REL * scale,
        );
        n_acts += 1;
    }
    if n_acts == 0 {
        st.violation(format!("no {prefix}* intermediates in the golden file"));
    }
    Ok(st.finish(&format!("{case} f64 (out + {n_acts} intermediates)")))
}

fn check_rel_l2<B: Backend>(
    be: &B,
    model: &FluxTransformer<B>,
    g: &GoldenFile,
    case: &str,
    golden: &str,
    label: &str,
    tol: f64,
) -> Result<CaseResult, DataError> {
    let (out, _) = run_model(be, model, g, case)?;
    let reference = &g.get(&format!("{case}.{golden}"))?.data;
    let mut st = ErrorStats::default();
    // Elementwise stats for the report; the pass criterion is the relative L2 error.
    st.compare("out", &out, reference, f64::INFINITY, 0.0);
    let r = if out.len() == reference.len() {
        rel_l2(&out, reference)
    } else {
        f64::INFINITY
    };
    if r.is_nan() || r > tol {
        st.violation(format!("rel_l2 {r:.3e} > {tol:.1e}"));
    }
    Ok(st.finish(&format!("{case} {label} rel_l2={r:.2e}")))
}

/// Runs every case of a `flux-transformer` folder on `be`. The f64 runs are reported as
/// skipped on a backend without f64.
pub fn run<B: Backend>(be: &B, folder: &Path) -> Result<Vec<CaseResult>, DataError> {
    let label = folder
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let manifest = read_json(&folder.join("manifest.json"))?;
    let golden_name = manifest
        .get("golden")
        .and_then(Value::as_str)
        .unwrap_or("golden.safetensors");
    let g = GoldenFile::open(&folder.join(golden_name))?;
    let files = weight_files(folder)?;
    let main = files
        .iter()
        .find(|f| !f.contains("bf16"))
        .ok_or_else(|| DataError::format(&folder.join("manifest.json"), "no f32 weights listed"))?;
    let bf16 = files.iter().find(|f| f.contains("bf16"));
    let has_f64 = be.supports_dtype(DType::F64);
    let no_f64 = format!("needs f64; backend {} has no f64", be.name());
    let m64 = if has_f64 {
        Some(load(be, &folder.join(main), DType::F64)?)
    } else {
        None
    };
    let m32 = load(be, &folder.join(main), DType::F32)?;
    let mb = match bf16 {
        Some(f) => Some((
            if has_f64 {
                Some(load(be, &folder.join(f), DType::F64)?)
            } else {
                None
            },
            load(be, &folder.join(f), DType::F32)?,
        )),
        None => None,
    };
    let mut out = Vec::new();
    for case in case_names(folder)? {
        let mut push = |r: Result<CaseResult, DataError>, what: &str| {
            let mut r =
                r.unwrap_or_else(|e| CaseResult::failed(&format!("{case} {what}"), &e.to_string()));
            r.name = format!("{label}/{}", r.name);
            out.push(r);
        };
        let skipped = |what: &str| Ok(CaseResult::skipped(&format!("{case} {what}"), &no_f64));
        push(
            m64.as_ref()
                .map_or_else(|| skipped("f64"), |m| check_f64(be, m, &g, &case)),
            "f64",
        );
        push(
            check_rel_l2(be, &m32, &g, &case, "f64.out", "f32", F32_REL_L2),
            "f32",
        );
        if let Some((b64, b32)) = &mb
            && g.try_get(&format!("{case}.bf16w_f64.out")).is_some()
        {
            push(
                b64.as_ref().map_or_else(
                    || skipped("bf16w-f64"),
                    |m| check_rel_l2(be, m, &g, &case, "bf16w_f64.out", "bf16w-f64", 1e-10),
                ),
                "bf16w-f64",
            );
            push(
                check_rel_l2(be, b32, &g, &case, "bf16w_f64.out", "bf16w-f32", F32_REL_L2),
                "bf16w-f32",
            );
        }
    }
    Ok(out)
}
