//! CPU model ops against direct f64 definitions written out here.

use flux_kernels::{Activation, ByteView, Cpu, DType, HostData, ModelOps, SamplerOps, Tensor};

fn rand(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

fn up(v: &[f64], shape: &[usize], dt: DType) -> Tensor<Cpu> {
    Cpu.upload(HostData::F64(v), shape, dt).unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn linear_widens_bf16_and_fp8_weights() {
    let (m, k, n) = (5, 40, 300);
    let x = rand(m * k, 5);
    let wv = rand(n * k, 6);
    let bias = rand(n, 7);
    let bf: Vec<half::bf16> = wv.iter().map(|&v| half::bf16::from_f64(v)).collect();
    let bytes: Vec<u8> = bf.iter().flat_map(|v| v.to_le_bytes()).collect();
    let w = Cpu
        .upload_weight(ByteView::from_vec(bytes), &[n, k], DType::BF16, None)
        .unwrap();
    let want: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            bias[c]
                + (0..k)
                    .map(|e| x[r * k + e] * bf[c * k + e].to_f64())
                    .sum::<f64>()
        })
        .collect();
    for dt in [DType::F64, DType::F32] {
        let got = Cpu
            .linear(&up(&x, &[m, k], dt), &w, Some(&up(&bias, &[n], dt)))
            .unwrap();
        let tol = if dt == DType::F64 { 1e-12 } else { 1e-4 };
        assert!(
            max_diff(&Cpu.download_f64(&got).unwrap(), &want) < tol,
            "{dt}"
        );
    }
    // fp8 e4m3fn: 0x38 = 1.0, 0x40 = 2.0, 0xb8 = -1.0, 0x01 = 2^-9; scale 0.5.
    let w8 = Cpu
        .upload_weight(
            ByteView::from_vec(vec![0x38, 0x40, 0xb8, 0x01]),
            &[4, 1],
            DType::F8E4M3,
            Some(0.5),
        )
        .unwrap();
    let got = Cpu
        .linear(&up(&[1.0], &[1, 1], DType::F64), &w8, None)
        .unwrap();
    assert_eq!(
        Cpu.download_f64(&got).unwrap(),
        vec![0.5, 1.0, -0.5, 2f64.powi(-10)]
    );
}

#[test]
fn norms_rope_and_gelu_match_their_definitions() {
    let (b, l, h, d) = (1, 3, 2, 4);
    let x = rand(b * l * h * d, 8);
    let cs: Vec<f64> = (0..l * d / 2)
        .flat_map(|i| [(i as f64).cos(), (i as f64).sin()])
        .collect();
    let got = Cpu
        .download_f64(
            &Cpu.rope(
                &up(&x, &[b, l, h, d], DType::F64),
                &up(&cs, &[1, l, d / 2, 2], DType::F64),
            )
            .unwrap(),
        )
        .unwrap();
    for t in 0..l {
        for hh in 0..h {
            for j in 0..d / 2 {
                let (c, s) = (cs[(t * d / 2 + j) * 2], cs[(t * d / 2 + j) * 2 + 1]);
                let o = (t * h + hh) * d + 2 * j;
                assert!((got[o] - (c * x[o] - s * x[o + 1])).abs() < 1e-15);
                assert!((got[o + 1] - (s * x[o] + c * x[o + 1])).abs() < 1e-15);
            }
        }
    }
    let ln = Cpu
        .download_f64(
            &Cpu.layer_norm(&up(&x, &[6, 4], DType::F64), None, None, 1e-6)
                .unwrap(),
        )
        .unwrap();
    for r in 0..6 {
        let row = &x[r * 4..r * 4 + 4];
        let mean = row.iter().sum::<f64>() / 4.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
        for j in 0..4 {
            assert!((ln[r * 4 + j] - (row[j] - mean) / (var + 1e-6).sqrt()).abs() < 1e-12);
        }
    }
    let g = Cpu
        .download_f64(
            &Cpu.activation(&up(&x, &[x.len()], DType::F64), Activation::GeluTanh)
                .unwrap(),
        )
        .unwrap();
    for (a, &v) in g.iter().zip(&x) {
        let want = 0.5
            * v
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
        assert!((a - want).abs() < 1e-15);
    }
    let e = Cpu
        .download_f64(
            &Cpu.activation(&up(&[0.5, -1.5], &[2], DType::F64), Activation::GeluErf)
                .unwrap(),
        )
        .unwrap();
    // erf(0.5/sqrt2) = 0.38292492254802624, erf(1.5/sqrt2) = 0.8663855974622838
    assert!((e[0] - 0.25 * (1.0 + 0.38292492254802624)).abs() < 1e-13);
    assert!((e[1] - (-0.75) * (1.0 - 0.8663855974622838)).abs() < 1e-13);
}
