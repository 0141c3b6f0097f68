//! Parity of the autoencoder (`flux-vae` folders): every image listed in `config.json`, the
//! float64 run against the f64 goldens (outputs ~1e-10, intermediates at f32 rounding) and a
//! float32 run against the same goldens within the README's tolerance.

use crate::data::{DataError, GoldenFile, read_json};
use crate::report::{CaseResult, ErrorStats};
use flux_kernels::{Backend, DType, HostData, Tensor};
use flux_model::tensor_source::MapSource;
use flux_model::vae::{Vae, VaeConfig};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Relative tolerance of float64 outputs against the f64 goldens.
pub const F64_REL: f64 = 1e-10;
/// rel_l2 tolerance of a float32 run (README: VAE <= 2e-5).
pub const F32_REL_L2: f64 = 2e-5;
/// Tolerance of intermediates (stored rounded to F32), relative to the tensor's largest value.
pub const ACT_REL: f64 = 1e-6;

/// The files a model folder's manifest names.
pub(crate) struct ModelFolder {
    pub config: Value,
    pub golden: GoldenFile,
    pub weights: Vec<PathBuf>,
}

pub(crate) fn open_folder(folder: &Path) -> Result<ModelFolder, DataError> {
    let mpath = folder.join("manifest.json");
    let m = read_json(&mpath)?;
    let file = |key: &str| -> Result<PathBuf, DataError> {
        m.get(key)
            .and_then(Value::as_str)
            .map(|s| folder.join(s))
            .ok_or_else(|| DataError::format(&mpath, format!("missing string field `{key}`")))
    };
    let config = read_json(&file("config")?)?;
    let golden = GoldenFile::open(&file("golden")?)?;
    let weights = m
        .get("weights")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(&mpath, "missing array field `weights`"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(|s| folder.join(s))
                .ok_or_else(|| DataError::format(&mpath, "`weights` entries must be strings"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ModelFolder {
        config,
        golden,
        weights,
    })
}

/// A weight tensor widened to f64: name, shape, values.
pub(crate) type HostTensor = (String, Vec<usize>, Vec<f64>);

/// Every tensor of the weight files, widened to f64.
pub(crate) fn read_weights(files: &[PathBuf]) -> Result<Vec<HostTensor>, DataError> {
    let mut out = Vec::new();
    for f in files {
        let g = GoldenFile::open(f)?;
        for name in g.names() {
            let t = g.get(name)?;
            out.push((name.to_string(), t.shape.clone(), t.data.clone()));
        }
    }
    Ok(out)
}

/// The weights uploaded as `dtype` tensors.
pub(crate) fn source<B: Backend>(
    be: &B,
    weights: &[HostTensor],
    dtype: DType,
    path: &Path,
) -> Result<MapSource<B>, DataError> {
    let mut s = MapSource::new();
    for (name, shape, data) in weights {
        let t = be
            .upload(HostData::F64(data), shape, dtype)
            .map_err(|e| DataError::format(path, format!("tensor {name}: {e}")))?;
        s.insert(name.clone(), t);
    }
    Ok(s)
}

pub(crate) fn usize_field(v: &Value, key: &str, path: &Path) -> Result<usize, DataError> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| DataError::format(path, format!("missing integer field `{key}`")))
}

pub(crate) fn f64_field(v: &Value, key: &str, path: &Path) -> Result<f64, DataError> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| DataError::format(path, format!("missing number field `{key}`")))
}

/// `||a - r|| / ||r||`.
pub fn rel_l2(a: &[f64], r: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(r).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = r.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Compares an output at `rel` relative to each element plus `rel` of the tensor's largest value
/// (elements near zero are judged against the tensor's scale).
pub(crate) fn compare_scaled(stats: &mut ErrorStats, what: &str, a: &[f64], r: &[f64], rel: f64) {
    let scale = r.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    stats.compare(what, a, r, rel, rel * scale);
}

/// Checks a float32 output's rel_l2 against `tol`, recording a violation; returns the value.
pub(crate) fn check_rel_l2(
    stats: &mut ErrorStats,
    what: &str,
    a: &[f64],
    r: &[f64],
    tol: f64,
) -> f64 {
    if a.len() != r.len() {
        stats.violation(format!(
            "{what}: {} values, reference has {}",
            a.len(),
            r.len()
        ));
        return f64::NAN;
    }
    let e = rel_l2(a, r);
    if e.is_nan() || e > tol {
        stats.violation(format!("{what}: float32 rel_l2 {e:.3e} > {tol:.1e}"));
    }
    e
}

/// The autoencoder configuration from a reference `config.json`.
pub fn vae_config(cfg: &Value, path: &Path) -> Result<VaeConfig, DataError> {
    let ch_mult = cfg
        .get("ch_mult")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(path, "missing array field `ch_mult`"))?
        .iter()
        .map(|v| v.as_u64().map(|x| x as usize))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| DataError::format(path, "`ch_mult` must hold integers"))?;
    Ok(VaeConfig {
        in_channels: usize_field(cfg, "in_channels", path)?,
        ch: usize_field(cfg, "ch", path)?,
        out_ch: usize_field(cfg, "out_ch", path)?,
        ch_mult,
        num_res_blocks: usize_field(cfg, "num_res_blocks", path)?,
        z_channels: usize_field(cfg, "z_channels", path)?,
        scale_factor: f64_field(cfg, "scale_factor", path)?,
        shift_factor: f64_field(cfg, "shift_factor", path)?,
        groups: cfg
            .get("groupnorm_groups")
            .and_then(Value::as_u64)
            .map_or(32, |x| x as usize),
        eps: cfg
            .get("groupnorm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6),
    })
}

type Acts = BTreeMap<String, Vec<f64>>;

fn recorder<'a, B: Backend>(be: &'a B, acts: &'a mut Acts) -> impl FnMut(&str, &Tensor<B>) + 'a {
    move |name: &str, t: &Tensor<B>| {
        if let Ok(v) = be.download_f64(t) {
            acts.insert(name.to_string(), v);
        }
    }
}

/// Compares every `<prefix>act.<name>` golden present for the traced `acts`.
pub(crate) fn compare_acts(
    stats: &mut ErrorStats,
    golden: &GoldenFile,
    prefix: &str,
    acts: &Acts,
) -> usize {
    let mut n = 0;
    for (name, v) in acts {
        if let Some(g) = golden.try_get(&format!("{prefix}act.{name}")) {
            compare_scaled(stats, &format!("act.{name}"), v, &g.data, ACT_REL);
            n += 1;
        }
    }
    n
}

/// The float64 checks of one image: encoder with its intermediates, decoder from the golden
/// latent. Returns the number of intermediates compared.
fn check_image_f64<B: Backend>(
    be: &B,
    name: &str,
    golden: &GoldenFile,
    vae64: &Vae<B>,
    stats: &mut ErrorStats,
) -> Result<usize, DataError> {
    let p = format!("{name}.");
    let get = |k: &str| golden.get(&format!("{p}{k}"));
    let kerr = |e: flux_model::tensor_source::NetError| {
        DataError::format(golden.path(), format!("{name}: {e}"))
    };
    let image = get("in.image")?;

    // float64: encoder with its intermediates.
    let x64 = be
        .upload(HostData::F64(&image.data), &image.shape, DType::F64)
        .map_err(|e| kerr(e.into()))?;
    let mut acts = Acts::new();
    let enc = vae64
        .encode_dist(be, &x64, &mut recorder(be, &mut acts))
        .map_err(kerr)?;
    let dl = |t: &Tensor<B>| be.download_f64(t).map_err(|e| kerr(e.into()));
    let mean = dl(&enc.mean)?;
    let logvar = dl(&enc.logvar)?;
    compare_scaled(stats, "f64.mean", &mean, &get("f64.mean")?.data, F64_REL);
    compare_scaled(
        stats,
        "f64.logvar",
        &logvar,
        &get("f64.logvar")?.data,
        F64_REL,
    );
    let z = dl(&vae64.scale_latent(be, &enc.mean).map_err(kerr)?)?;
    compare_scaled(
        stats,
        "f64.z_scaled",
        &z,
        &get("f64.z_scaled")?.data,
        F64_REL,
    );
    if let Some(eps) = golden.try_get(&format!("{p}in.eps")) {
        // The sampling variant: mean + exp(logvar / 2) * eps, then the same scaling.
        let cfg = vae64.config();
        let sample: Vec<f64> = mean
            .iter()
            .zip(&logvar)
            .zip(&eps.data)
            .map(|((m, lv), e)| m + (0.5 * lv).exp() * e)
            .collect();
        acts.insert("z_sample".into(), sample.clone());
        let scaled: Vec<f64> = sample
            .iter()
            .map(|s| cfg.scale_factor * (s - cfg.shift_factor))
            .collect();
        if let Some(g) = golden.try_get(&format!("{p}f64.z_sample_scaled")) {
            compare_scaled(stats, "f64.z_sample_scaled", &scaled, &g.data, F64_REL);
        }
    }

    // float64: decoder from the golden latent, so its check does not inherit encoder error.
    let zg = get("f64.z_scaled")?;
    let z64 = be
        .upload(HostData::F64(&zg.data), &zg.shape, DType::F64)
        .map_err(|e| kerr(e.into()))?;
    let dec = vae64
        .decode_traced(be, &z64, &mut recorder(be, &mut acts))
        .map_err(kerr)?;
    compare_scaled(
        stats,
        "f64.decoded",
        &dl(&dec)?,
        &get("f64.decoded")?.data,
        F64_REL,
    );
    let n_acts = compare_acts(stats, golden, &p, &acts);
    if n_acts == 0 {
        stats.violation(format!("{name}: no intermediate activation was compared"));
    }

    Ok(n_acts)
}

/// The float32 checks of one image against the f64 goldens; returns the rel_l2 of the encoded
/// latent and of the decoded image.
fn check_image_f32<B: Backend>(
    be: &B,
    name: &str,
    golden: &GoldenFile,
    vae32: &Vae<B>,
    stats: &mut ErrorStats,
) -> Result<(f64, f64), DataError> {
    let p = format!("{name}.");
    let get = |k: &str| golden.get(&format!("{p}{k}"));
    let kerr = |e: flux_model::tensor_source::NetError| {
        DataError::format(golden.path(), format!("{name}: {e}"))
    };
    let dl = |t: &Tensor<B>| be.download_f64(t).map_err(|e| kerr(e.into()));
    let image = get("in.image")?;
    let zg = get("f64.z_scaled")?;
    let x32 = be
        .upload(HostData::F64(&image.data), &image.shape, DType::F32)
        .map_err(|e| kerr(e.into()))?;
    let z32 = dl(&vae32.encode(be, &x32).map_err(kerr)?)?;
    let e_z = check_rel_l2(stats, "f32 z_scaled", &z32, &zg.data, F32_REL_L2);
    let zin = be
        .upload(HostData::F64(&zg.data), &zg.shape, DType::F32)
        .map_err(|e| kerr(e.into()))?;
    let d32 = dl(&vae32.decode(be, &zin).map_err(kerr)?)?;
    let e_d = check_rel_l2(
        stats,
        "f32 decoded",
        &d32,
        &get("f64.decoded")?.data,
        F32_REL_L2,
    );
    Ok((e_z, e_d))
}

/// One image: a single result with the f64 and f32 checks where the backend has f64; else a
/// skipped f64 result and the f32 result on their own.
fn run_image<B: Backend>(
    be: &B,
    name: &str,
    golden: &GoldenFile,
    vae64: Option<&Vae<B>>,
    vae32: &Vae<B>,
) -> Vec<CaseResult> {
    let label = format!("vae/{name}");
    let fail = |e: DataError| CaseResult::failed(&label, &e.to_string());
    let Some(vae64) = vae64 else {
        let mut stats = ErrorStats::default();
        let f32 = match check_image_f32(be, name, golden, vae32, &mut stats) {
            Ok((e_z, e_d)) => {
                let mut r = stats.finish(&format!("{label} f32"));
                if r.passed() {
                    r.detail = format!("f32 rel_l2 z_scaled {e_z:.2e}, decoded {e_d:.2e}");
                }
                r
            }
            Err(e) => CaseResult::failed(&format!("{label} f32"), &e.to_string()),
        };
        return vec![
            CaseResult::skipped(
                &format!("{label} f64"),
                &format!("needs f64; backend {} has no f64", be.name()),
            ),
            f32,
        ];
    };
    let mut stats = ErrorStats::default();
    let n_acts = match check_image_f64(be, name, golden, vae64, &mut stats) {
        Ok(n) => n,
        Err(e) => return vec![fail(e)],
    };
    let (e_z, e_d) = match check_image_f32(be, name, golden, vae32, &mut stats) {
        Ok(v) => v,
        Err(e) => return vec![fail(e)],
    };
    let mut r = stats.finish(&label);
    if r.passed() {
        r.detail =
            format!("{n_acts} intermediates; f32 rel_l2 z_scaled {e_z:.2e}, decoded {e_d:.2e}");
    }
    vec![r]
}

/// The image cases `config.json` lists (their names).
pub fn case_names(config: &Value, path: &Path) -> Result<Vec<String>, DataError> {
    config
        .get("images")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::format(path, "missing array field `images`"))?
        .iter()
        .map(|c| {
            c.get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| DataError::format(path, "every image needs a `name`"))
        })
        .collect()
}

/// Runs every image case of a `flux-vae` folder on `be` (the f64 checks are reported as skipped
/// on a backend without f64).
pub fn run<B: Backend>(be: &B, folder: &Path) -> Result<Vec<CaseResult>, DataError> {
    let mf = open_folder(folder)?;
    let cpath = folder.join("config.json");
    let cfg = vae_config(&mf.config, &cpath)?;
    let weights = read_weights(&mf.weights)?;
    let wpath = mf
        .weights
        .first()
        .cloned()
        .unwrap_or_else(|| folder.to_path_buf());
    let build = |dtype| -> Result<Vae<B>, DataError> {
        let mut src = source(be, &weights, dtype, &wpath)?;
        Vae::load(cfg.clone(), &mut src).map_err(|e| DataError::format(&wpath, e.to_string()))
    };
    let vae64 = if be.supports_dtype(DType::F64) {
        Some(build(DType::F64)?)
    } else {
        None
    };
    let vae32 = build(DType::F32)?;
    let names = case_names(&mf.config, &cpath)?;
    Ok(names
        .iter()
        .flat_map(|n| run_image(be, n, &mf.golden, vae64.as_ref(), &vae32))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::rel_l2;

    #[test]
    fn rel_l2_of_a_known_pair() {
        assert!((rel_l2(&[3.0, 4.0], &[3.0, 0.0]) - 4.0 / 3.0).abs() < 1e-15);
        assert_eq!(rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    }
}
