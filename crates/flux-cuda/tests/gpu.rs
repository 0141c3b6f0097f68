//! Tests that launch kernels. They need a CUDA GPU and are ignored elsewhere (reported as
//! ignored, never as passed); `scripts/gpu-check.sh` runs them with `--include-ignored`. On a
//! machine where they are run but no device opens, they fail with the reason. `.ci/run` also
//! runs them on the CPU model of the CUDA libraries (`examples/cuda_model.rs`), whose device
//! name says so: that checks the host code and the kernels' logic, not the GPU.

use flux_cuda::Cuda;
use flux_kernels::conformance::Tolerances;
use flux_kernels::{Cpu, DType, HostData, SamplerOps};
use flux_samplers::toy::every_sampler_against_cpu;

fn cuda() -> Cuda {
    Cuda::new().unwrap_or_else(|e| panic!("the CUDA backend could not be created: {e}"))
}

/// f32 compute matches the CPU to 1e-5 relative. Linear layers with bf16 / fp8 weights run on
/// the tensor cores with the activations rounded to bf16 (relative error up to 2^-9 per input,
/// about 1e-3 of the output's RMS), hence the looser bound for ops that read packed weights.
const TOL: Tolerances = Tolerances {
    rel: 1e-5,
    weight_rel: 1e-2,
};

/// One ignored test per op family of the backend conformance suite.
macro_rules! conformance {
    ($($op:ident),* $(,)?) => {
        $(
            #[test]
            #[ignore = "needs a CUDA GPU"]
            fn $op() {
                let be = cuda();
                let failures = flux_kernels::conformance::$op(&be, TOL);
                assert!(
                    failures.is_empty(),
                    "{} conformance failures on {}:\n{}",
                    failures.len(),
                    be.name(),
                    failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
                );
            }
        )*
    };
}

conformance!(
    memory,
    dtype_support,
    lincomb,
    reductions,
    weights,
    linear,
    matmul,
    norms,
    modulation,
    activations,
    elementwise,
    softmax,
    rope,
    attention,
    layout,
    conv2d,
    group_norm,
    image_ops,
    bad_input,
);

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_sampler_matches_the_cpu_on_the_device() {
    let gpu = cuda();
    // f32 on both sides; the update order is the same, only FMA contraction differs.
    let (checked, failures) = every_sampler_against_cpu(&gpu, 1e-4);
    assert!(checked > 0, "no sampler was run");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The activations of [`linear_case`]: a fixed pseudo-random pattern in [-1, 1].
fn linear_input(m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| ((i * 31 % 997) as f32 / 498.5) - 1.0)
        .collect()
}

/// `x [m, k] W [n, k]^T + bias` with packed weights of `dtype` (and `scale`) on `be`; returns
/// the result as f64.
fn linear_case<B: flux_kernels::Backend>(
    be: &B,
    x: &[f32],
    (m, k, n): (usize, usize, usize),
    weight: &flux_kernels::ByteView,
    dtype: DType,
    scale: Option<f32>,
) -> Vec<f64> {
    let bias: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
    let xt = be.upload(HostData::F32(x), &[m, k], DType::F32).unwrap();
    let wt = be
        .upload_weight(weight.clone(), &[n, k], dtype, scale)
        .unwrap();
    let bt = be.upload(HostData::F32(&bias), &[n], DType::F32).unwrap();
    be.download_f64(&be.linear(&xt, &wt, Some(&bt)).unwrap())
        .unwrap()
}

/// `x` as the fp8 path quantises it (per tensor, scale 448 / amax rounded to f32, nearest
/// e4m3 with ties to even) and dequantises it (amax / 448 rounded to f32), in f32.
fn fp8_quantised(x: &[f32]) -> Vec<f32> {
    use flux_kernels::cpu::{f8e4m3_to_f32, f32_to_f8e4m3};
    let amax = f64::from(x.iter().fold(0f32, |a, v| a.max(v.abs())));
    let (q, dq) = ((448.0 / amax) as f32, (amax / 448.0) as f32);
    x.iter()
        .map(|&v| f8e4m3_to_f32(f32_to_f8e4m3(v * q)) * dq)
        .collect()
}

/// Relative L2 error of `got` against `want`.
fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_linear_at_a_flux_shape_matches_the_cpu() {
    let dims = (77usize, 3072usize, 1024usize);
    let (_, k, n) = dims;
    let w: Vec<u8> = (0..n * k)
        .flat_map(|i| half::bf16::from_f32(((i * 17 % 991) as f32 / 4955.0) - 0.1).to_le_bytes())
        .collect();
    let view = flux_kernels::ByteView::from_vec(w);
    let x = linear_input(dims.0, k);
    let want = linear_case(&Cpu, &x, dims, &view, DType::BF16, None);
    let got = linear_case(&cuda(), &x, dims, &view, DType::BF16, None);
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len() as f64).sqrt();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(rms))
        .fold(0.0f64, f64::max);
    assert!(worst < 1e-2, "worst relative error {worst:.3e}");
}

/// fp8 weights multiplied in fp8 (`with_fp8_gemm`): the activations are quantised to e4m3 per
/// tensor on the device, so the result must match the CPU's GEMM of the same fp8 weights with
/// the activations quantised the same way on the host, to f32 accumulation (relative L2 1e-3;
/// a lost scale, a transposed operand or a wrong bias gives O(1), and the bf16 fallback, which
/// does not quantise the activations, gives about 6e-2 here: a refused fp8 GEMM fails this).
/// The shape is a Flux one (multiples of 16, as cuBLASLt's fp8 kernels need). Devices below
/// compute capability 8.9 have no fp8 GEMM: there the setting must leave the bf16 path's
/// result unchanged. The weight scale (0.5) must reach the product.
#[test]
#[ignore = "needs a CUDA GPU"]
fn fp8_linear_matches_the_cpu() {
    let dims = (96usize, 3072usize, 1024usize);
    let (m, k, n) = dims;
    // e4m3 codes of moderate magnitude, both signs (0x30..0x3f: 0.5 to 1.875).
    let w: Vec<u8> = (0..n * k)
        .map(|i| (0x30 + (i * 7 % 16) as u8) | if i % 3 == 0 { 0x80 } else { 0 })
        .collect();
    let view = flux_kernels::ByteView::from_vec(w);
    let x = linear_input(m, k);
    let want = linear_case(&Cpu, &x, dims, &view, DType::F8E4M3, Some(0.5));
    let want_q = linear_case(
        &Cpu,
        &fp8_quantised(&x),
        dims,
        &view,
        DType::F8E4M3,
        Some(0.5),
    );
    let be = cuda().with_fp8_gemm(true);
    let fp8 = linear_case(&be, &x, dims, &view, DType::F8E4M3, Some(0.5));
    let bf16 = linear_case(&cuda(), &x, dims, &view, DType::F8E4M3, Some(0.5));
    let e16 = rel_l2(&bf16, &want);
    assert!(e16 < 1e-2, "bf16 path: rel_l2 {e16:.3e}");
    if be.compute_capability() < (8, 9) {
        assert_eq!(fp8, bf16, "no fp8 GEMM below sm_89: the bf16 path must run");
        println!("fp8 linear: sm < 8.9, bf16 path (rel_l2 {e16:.3e})");
        return;
    }
    assert!(
        !be.fp8_gemm_refused(m, n, k),
        "cuBLASLt refused the fp8 GEMM [{m}, {k}] x [{n}, {k}]^T"
    );
    let eq = rel_l2(&fp8, &want_q);
    assert!(
        eq.is_finite() && eq < 1e-3,
        "fp8 path: rel_l2 {eq:.3e} against the quantised reference"
    );
    println!(
        "fp8 linear: rel_l2 {eq:.3e} against the quantised reference, {:.3e} against f32 (bf16 path {e16:.3e})",
        rel_l2(&fp8, &want)
    );
}

/// The tensor-core attention (bf16 operands, f32 accumulation) against the CPU's f64 result on
/// the same f32 inputs, at awkward sizes: rows and keys not multiples of the 64-row and 64-key
/// tiles, several heads and batches, a broadcast bias with masked (-inf) keys, every head dim
/// the kernel serves. Rounding q, k, v and the softmax weights to bf16 (relative 2^-9 each)
/// leaves a relative L2 error of a few 1e-3; a wrong fragment layout or a lost tile gives O(1).
/// The exact kernel (the default) must still match to 1e-5, and the two must differ (proof
/// that the tensor-core path ran).
#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_tensor_core_attention_matches_the_cpu() {
    use flux_kernels::ModelOps;
    let exact = cuda();
    let tc = exact.clone().with_bf16_attention(true);
    // (batch, query rows, keys, heads, head dim, bias: broadcast over the batch)
    let cases = [
        (1usize, 600usize, 600usize, 2usize, 128usize, false),
        (2, 77, 130, 3, 64, false),
        (1, 5, 1000, 2, 32, false),
        (2, 70, 71, 2, 16, true),
        (1, 129, 65, 1, 128, true),
    ];
    let mut failures = Vec::new();
    for (ci, &(b, lq, lk, h, d, with_bias)) in cases.iter().enumerate() {
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
                .map(|v| v * 1.5)
                .collect()
        };
        let qv = values(b * lq * h * d, 1);
        let kv = values(b * lk * h * d, 2);
        let vv = values(b * lk * h * d, 3);
        // Bias [1, h, lq, lk]: smooth values, every 7th key masked.
        let bias: Vec<f32> = (0..h * lq * lk)
            .map(|i| {
                if i % lk % 7 == 3 {
                    f32::NEG_INFINITY
                } else {
                    ((i % 13) as f32 - 6.0) * 0.1
                }
            })
            .collect();
        macro_rules! attend {
            ($be:expr) => {{
                let be = $be;
                let q = be
                    .upload(HostData::F32(&qv), &[b, lq, h, d], DType::F32)
                    .unwrap();
                let k = be
                    .upload(HostData::F32(&kv), &[b, lk, h, d], DType::F32)
                    .unwrap();
                let v = be
                    .upload(HostData::F32(&vv), &[b, lk, h, d], DType::F32)
                    .unwrap();
                let bt = with_bias.then(|| {
                    be.upload(HostData::F32(&bias), &[1, h, lq, lk], DType::F32)
                        .unwrap()
                });
                let o = be.attention(&q, &k, &v, bt.as_ref(), None).unwrap();
                be.download_f64(&o).unwrap()
            }};
        }
        let want = {
            let be = &Cpu;
            let up = |x: &[f32], s: &[usize]| {
                let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
                be.upload(HostData::F64(&x64), s, DType::F64).unwrap()
            };
            let q = up(&qv, &[b, lq, h, d]);
            let k = up(&kv, &[b, lk, h, d]);
            let v = up(&vv, &[b, lk, h, d]);
            let bt = with_bias.then(|| up(&bias, &[1, h, lq, lk]));
            let o = be.attention(&q, &k, &v, bt.as_ref(), None).unwrap();
            be.download_f64(&o).unwrap()
        };
        let got_exact = attend!(&exact);
        let got_tc = attend!(&tc);
        let e_exact = rel_l2(&got_exact, &want);
        let e_tc = rel_l2(&got_tc, &want);
        let label = format!("case {ci} (b={b}, lq={lq}, lk={lk}, h={h}, d={d}, bias={with_bias})");
        if e_exact.is_nan() || e_exact >= 1e-5 {
            failures.push(format!("{label}: exact kernel rel_l2 {e_exact:.3e}"));
        }
        if e_tc.is_nan() || e_tc >= 1e-2 || got_tc.iter().any(|v| !v.is_finite()) {
            failures.push(format!("{label}: tensor-core kernel rel_l2 {e_tc:.3e}"));
        }
        if got_tc == got_exact {
            failures.push(format!(
                "{label}: tensor-core result equals the exact one (not run?)"
            ));
        }
        eprintln!("{label}: rel_l2 exact {e_exact:.2e}, tensor cores {e_tc:.2e}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
