//! The Flux denoiser against the transformer goldens: packing, position ids, and
//! `denoised = x - sigma * v` with `v` the reference velocity.

use flux_kernels::{Cpu, DType, HostData, SamplerOps};
use flux_model::denoiser::{Conditioning, FluxDenoiser, img_ids, pack, unpack};
use flux_model::transformer::FluxTransformer;
use flux_model::weights::Weights;
use flux_samplers::Denoiser;
use std::path::{Path, PathBuf};

fn folder() -> PathBuf {
    match std::env::var_os("FLUX_REFERENCE_DIR") {
        Some(d) => PathBuf::from(d).join("flux-tiny/transformer-dev"),
        None => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/flux-tiny/transformer-dev")
        }
    }
}

fn case_names(g: &Weights) -> Vec<String> {
    let mut v: Vec<String> = g
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".in.latent").map(str::to_string))
        .collect();
    v.sort();
    v
}

#[test]
fn packing_matches_the_reference() {
    let g = Weights::open(&folder().join("golden.safetensors")).unwrap();
    let cases = case_names(&g);
    assert!(!cases.is_empty());
    for case in cases {
        let s = g.shape(&format!("{case}.in.latent")).unwrap().to_vec();
        let latent = g.host_f64(&format!("{case}.in.latent")).unwrap();
        let (tokens, hp, wp) = pack(&latent, s[0], s[1], s[2], s[3]);
        assert_eq!(
            tokens,
            g.host_f64(&format!("{case}.in.img")).unwrap(),
            "{case}: tokens"
        );
        assert_eq!(
            img_ids(s[0], hp, wp),
            g.host_f64(&format!("{case}.in.img_ids")).unwrap(),
            "{case}: ids"
        );
        assert_eq!(
            unpack(&tokens, s[0], s[1], s[2], s[3]),
            latent,
            "{case}: unpack"
        );
    }
}

#[test]
fn denoised_is_x_minus_sigma_v() {
    let dir = folder();
    let g = Weights::open(&dir.join("golden.safetensors")).unwrap();
    let model = FluxTransformer::load(
        &Cpu,
        &Weights::open(&dir.join("weights.safetensors")).unwrap(),
        DType::F64,
    )
    .unwrap();
    for case in case_names(&g) {
        let get = |n: &str| g.host_f64(&format!("{case}.{n}")).unwrap();
        let s = g.shape(&format!("{case}.in.latent")).unwrap().to_vec();
        let txt_shape = g.shape(&format!("{case}.in.txt")).unwrap().to_vec();
        let (ts, gd) = (get("in.timesteps"), get("in.guidance"));
        let b = s[0];
        // The denoiser takes one sigma, guidance and prompt per call: check batch items one by one.
        let per_txt = txt_shape[1] * txt_shape[2];
        let per_y = get("in.y").len() / b;
        let per_lat = s[1] * s[2] * s[3];
        let (lat, txt, y, v) = (get("in.latent"), get("in.txt"), get("in.y"), get("f64.out"));
        for bi in 0..b {
            let cond = Conditioning {
                txt: txt[bi * per_txt..(bi + 1) * per_txt].to_vec(),
                txt_len: txt_shape[1],
                y: y[bi * per_y..(bi + 1) * per_y].to_vec(),
            };
            let mut d = FluxDenoiser::new(&model, cond.clone(), gd[bi]);
            let x = Cpu
                .upload(
                    HostData::F64(&lat[bi * per_lat..(bi + 1) * per_lat]),
                    &[1, s[1], s[2], s[3]],
                    DType::F64,
                )
                .unwrap();
            let out = d.denoise(&Cpu, &x, ts[bi], true).unwrap();
            let per_v = v.len() / b;
            let vel = unpack(&v[bi * per_v..(bi + 1) * per_v], 1, s[1], s[2], s[3]);
            let xv = &lat[bi * per_lat..(bi + 1) * per_lat];
            let got = Cpu.download_f64(&out.denoised).unwrap();
            for ((g, x), v) in got.iter().zip(xv).zip(&vel) {
                let want = x - ts[bi] * v;
                assert!((g - want).abs() < 1e-9, "{case}[{bi}]: {g} vs {want}");
            }
            assert_eq!(Cpu.download_f64(&out.uncond.unwrap()).unwrap(), got);
            // cfg with the same prompt as negative changes nothing and runs batched.
            let mut d2 = FluxDenoiser::new(&model, cond.clone(), gd[bi]).with_cfg(cond, 3.0);
            let got2 = Cpu
                .download_f64(&d2.denoise(&Cpu, &x, ts[bi], false).unwrap().denoised)
                .unwrap();
            for (a, c) in got2.iter().zip(&got) {
                assert!((a - c).abs() < 1e-9);
            }
        }
    }
}
