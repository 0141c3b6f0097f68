// Pointwise activations.

struct ActParams {
    n: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

// 0: SiLU, 1: GELU (tanh), 2: GELU (erf), 3: QuickGELU, 4: ReLU.
override ACT: u32 = 0u;

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<uniform> p: ActParams;

// erf to about 1e-7 absolute (Abramowitz and Stegun 7.1.26 is too coarse): Taylor series for
// small |x|, erfc continued-fraction-like rational fit for the tail.
fn erf_f32(x: f32) -> f32 {
    let a = abs(x);
    var r = 0.0;
    if (a < 2.0) {
        // Maclaurin series of erf; 2^k / (1 3 5 ... (2k+1)) form converges fast for a < 2.
        let x2 = a * a;
        var term = a;
        var sum = a;
        for (var k = 1u; k < 40u; k = k + 1u) {
            term = term * x2 / (f32(k) + 0.5);
            sum = sum + term;
        }
        r = 1.1283791670955126 * exp(-x2) * sum;
    } else {
        // Continued fraction for erfc, evaluated bottom-up.
        var f = a;
        for (var n = 60u; n >= 1u; n = n - 1u) {
            f = a + (f32(n) * 0.5) / f;
        }
        r = 1.0 - exp(-a * a) / (1.7724538509055159 * f);
    }
    return select(r, -r, x < 0.0);
}

fn sigmoid_mul(v: f32, k: f32) -> f32 {
    // v / (1 + e^(-k v)); exp may overflow to +inf, giving the correct signed zero.
    return v / (1.0 + exp(-k * v));
}

@compute @workgroup_size(256)
fn activation(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let v = x[i];
    var y = 0.0;
    switch ACT {
        case 1u: {
            let u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
            // tanh through exp of a negative argument (no overflow).
            let e = exp(-2.0 * abs(u));
            let t = (1.0 - e) / (1.0 + e);
            y = 0.5 * v * (1.0 + select(t, -t, u < 0.0));
        }
        case 2u: {
            y = 0.5 * v * (1.0 + erf_f32(v * 0.7071067811865476));
        }
        case 3u: {
            y = sigmoid_mul(v, 1.702);
        }
        case 4u: {
            y = max(v, 0.0);
        }
        default: {
            y = sigmoid_mul(v, 1.0);
        }
    }
    out[i] = y;
}
