//! The two ways f16 weights are read: native `f16` loads (`shader-f16`, used where the adapter
//! offers it) and packed words widened in the shader. Both widen exactly, so every op reading an
//! f16 weight gives the same bits either way.

mod common;

use flux_kernels::{ByteView, DType, HostData, ModelOps, SamplerOps};

/// `linear` (odd sizes, bias) and `cast` of an f16 weight, as f32 bits.
fn f16_ops(be: &flux_wgpu::Wgpu) -> Vec<u32> {
    let (m, k, n) = (5usize, 37usize, 29usize);
    let w: Vec<u8> = (0..n * k)
        .flat_map(|i| half::f16::from_f64(((i * 37 % 101) as f64 - 50.0) / 7.0).to_le_bytes())
        .collect();
    let w = be
        .upload_weight(ByteView::from_vec(w), &[n, k], DType::F16, None)
        .expect("weight");
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
        .collect();
    let x = be
        .upload(HostData::F32(&x), &[m, k], DType::F32)
        .expect("x");
    let bias: Vec<f32> = (0..n).map(|i| i as f32 / 4.0).collect();
    let bias = be
        .upload(HostData::F32(&bias), &[n], DType::F32)
        .expect("bias");
    let y = be.linear(&x, &w, Some(&bias)).expect("linear");
    let c = be.cast(&w, DType::F32).expect("cast");
    let mut out = be.download_f64(&y).expect("y");
    out.extend(be.download_f64(&c).expect("c"));
    out.iter().map(|&v| (v as f32).to_bits()).collect()
}

#[test]
#[cfg_attr(
    not(flux_adapter_tests),
    ignore = "needs a wgpu adapter (FLUX_REQUIRE_ADAPTER=1)"
)]
fn native_and_packed_f16_weights_give_the_same_bits() {
    let Some(native) = common::backend() else {
        return;
    };
    let Some(packed) = common::backend_with(flux_wgpu::WgpuOptions {
        packed_f16: true,
        ..flux_wgpu::WgpuOptions::default()
    }) else {
        return;
    };
    assert_eq!(native.uses_shader_f16(), native.adapter_has_shader_f16());
    assert!(!packed.uses_shader_f16());
    if !native.uses_shader_f16() {
        eprintln!("skipped: the adapter has no shader-f16, both runs are packed");
        return;
    }
    assert_eq!(f16_ops(&native), f16_ops(&packed));
}
