//! Tiled autoencoder against the untiled one: the tiles carry the halo every convolution needs
//! and every group norm uses whole-image statistics, so the results agree up to rounding (the
//! order of the statistics' sums and the GEMM blocking differ).

use flux_kernels::{Cpu, DType, HostData, SamplerOps, Tensor};
use flux_model::tensor_source::random_source;
use flux_model::vae::{TileConfig, Vae, VaeConfig};
use proptest::prelude::*;

/// Tiled vs untiled rel_l2 bound in f64 (measured on these cases: 2e-15 to 6e-15).
const TOL_F64: f64 = 1e-12;
/// Tiled vs untiled rel_l2 bound in f32 (measured on these cases: 3e-7 and 5e-7).
const TOL_F32: f64 = 2e-6;

fn tiny() -> VaeConfig {
    VaeConfig {
        ch: 8,
        ch_mult: vec![1, 1, 2, 2],
        num_res_blocks: 1,
        groups: 4,
        ..VaeConfig::flux()
    }
}

fn vae(dtype: DType) -> Vae<Cpu> {
    let cfg = tiny();
    let mut src = random_source(&Cpu, &cfg.weight_shapes(), 11, dtype).unwrap();
    Vae::load(cfg, &mut src).unwrap()
}

/// Pseudo-random values in [-1, 1) (SplitMix64), plus a smooth component so that tiles differ
/// in their statistics.
fn tensor(shape: &[usize], seed: u64, dtype: DType) -> Tensor<Cpu> {
    let w = shape[3];
    let mut s = seed;
    let v: Vec<f64> = (0..shape.iter().product::<usize>())
        .map(|i| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let r = (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0;
            let (y, x) = ((i / w) as f64, (i % w) as f64);
            0.5 * r + 0.5 * (x * 0.13).sin() * (y * 0.07).cos()
        })
        .collect();
    Cpu.upload(HostData::F64(&v), shape, dtype).unwrap()
}

fn rel_l2(a: &Tensor<Cpu>, b: &Tensor<Cpu>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (Cpu.download_f64(a).unwrap(), Cpu.download_f64(b).unwrap());
    let n: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let d: f64 = b.iter().map(|y| y * y).sum();
    (n / d).sqrt()
}

fn check_encode(v: &Vae<Cpu>, shape: [usize; 4], tile: usize, dtype: DType, tol: f64) {
    let x = tensor(&shape, 1, dtype);
    let full = v.encode(&Cpu, &x).unwrap();
    let tiled = v.encode_tiled(&Cpu, &x, TileConfig { tile }).unwrap();
    let e = rel_l2(&tiled, &full);
    eprintln!("encode {shape:?} tile {tile} {dtype:?}: rel_l2 {e:.2e}");
    assert!(
        e < tol,
        "encode {shape:?} tile {tile}: rel_l2 {e:e} >= {tol:e}"
    );
}

fn check_decode(v: &Vae<Cpu>, shape: [usize; 4], tile: usize, dtype: DType, tol: f64) {
    let z = tensor(&shape, 2, dtype);
    let full = v.decode(&Cpu, &z).unwrap();
    let tiled = v.decode_tiled(&Cpu, &z, TileConfig { tile }).unwrap();
    let e = rel_l2(&tiled, &full);
    eprintln!("decode {shape:?} tile {tile} {dtype:?}: rel_l2 {e:.2e}");
    assert!(
        e < tol,
        "decode {shape:?} tile {tile}: rel_l2 {e:e} >= {tol:e}"
    );
}

#[test]
fn tiled_encode_matches_untiled_f64() {
    let v = vae(DType::F64);
    for (shape, tile) in [
        // 12x16 latent in 4x4 tiles.
        ([1, 3, 96, 128], 4),
        // Non-square, sides not a multiple of the tile (13x9 latent: 1-pixel last tiles).
        ([1, 3, 104, 72], 4),
        // Sides not a multiple of the downsampling factor (latent 12x10).
        ([1, 3, 100, 86], 5),
        // A strip: one tile row, 1-pixel tiles along it; two images with their own statistics.
        ([2, 3, 16, 88], 1),
    ] {
        check_encode(&v, shape, tile, DType::F64, TOL_F64);
    }
}

#[test]
fn tiled_decode_matches_untiled_f64() {
    let v = vae(DType::F64);
    for (shape, tile) in [
        ([1, 16, 12, 16], 4),
        ([1, 16, 9, 13], 4),
        ([1, 16, 7, 11], 2),
        ([2, 16, 1, 10], 3),
    ] {
        check_decode(&v, shape, tile, DType::F64, TOL_F64);
    }
}

#[test]
fn tiled_matches_untiled_f32() {
    let v = vae(DType::F32);
    check_encode(&v, [1, 3, 104, 72], 4, DType::F32, TOL_F32);
    check_decode(&v, [1, 16, 9, 13], 4, DType::F32, TOL_F32);
}

#[test]
fn one_tile_is_the_untiled_computation() {
    let v = vae(DType::F64);
    let z = tensor(&[1, 16, 5, 6], 3, DType::F64);
    let one = v.decode_tiled(&Cpu, &z, TileConfig { tile: 6 }).unwrap();
    let full = v.decode(&Cpu, &z).unwrap();
    assert_eq!(
        Cpu.download_f64(&one).unwrap(),
        Cpu.download_f64(&full).unwrap()
    );
}

#[test]
fn bad_tiles_and_inputs_are_refused() {
    let v = vae(DType::F64);
    let z = tensor(&[1, 16, 4, 4], 3, DType::F64);
    let err = v
        .decode_tiled(&Cpu, &z, TileConfig { tile: 0 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("tile"), "{err}");
    let z = tensor(&[1, 4, 4, 4], 3, DType::F64);
    let err = v
        .decode_tiled(&Cpu, &z, TileConfig { tile: 2 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("[N, 16, h, w]"), "{err}");
    let x = tensor(&[1, 4, 32, 32], 3, DType::F64);
    let err = v
        .encode_tiled(&Cpu, &x, TileConfig { tile: 2 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("[N, 3, H, W]"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn tiled_matches_untiled_for_any_size(
        lh in 1usize..9,
        lw in 1usize..9,
        tile in 1usize..5,
        extra_h in 0usize..8,
        extra_w in 0usize..8,
    ) {
        let v = vae(DType::F64);
        let f = tiny().downsample_factor();
        let x = tensor(&[1, 3, lh * f + extra_h, lw * f + extra_w], 5, DType::F64);
        let full = v.encode(&Cpu, &x).unwrap();
        let tiled = v.encode_tiled(&Cpu, &x, TileConfig { tile }).unwrap();
        prop_assert!(rel_l2(&tiled, &full) < TOL_F64);
        let dec = v.decode(&Cpu, &full).unwrap();
        let dec_t = v.decode_tiled(&Cpu, &full, TileConfig { tile }).unwrap();
        prop_assert_eq!(dec_t.shape(), &[1, 3, lh * f, lw * f]);
        prop_assert!(rel_l2(&dec_t, &dec) < TOL_F64);
    }
}
