// Tiled matrix multiply with workgroup memory and 4x4 register blocking:
// C[z, i, col0 + j] = alpha * sum_k A(z, i, k) B(z, k, j) + bias[col0 + j]
// for a 64x64 output tile per workgroup of 16x16 threads, 16-deep K slices.
// A is f32 with strides (a_sm, a_sk); B is a packed weight (see weights.wgsl) with strides
// (b_sk, b_sn), which covers linear layers (B = W^T), batched matmuls and both transposes.

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    a_sm: u32,
    a_sk: u32,
    a_sz: u32,
    b_sk: u32,
    b_sn: u32,
    b_sz: u32,
    ldc: u32,
    c_sz: u32,
    col0: u32,
    has_bias: u32,
    wscale: f32,
    alpha: f32,
    c_off: u32,
    a_off: u32,
    b_off: u32,
}

@group(0) @binding(0) var<storage, read_write> c: array<f32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> wbuf: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<uniform> p: MatmulParams;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // [TK][TM]
var<workgroup> Bs: array<f32, 1024>; // [TK][TN]

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let z = wid.z;
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let tid = lid.y * 16u + lid.x;
    let abase = p.a_off + z * p.a_sz;
    let bbase = p.b_off + z * p.b_sz;
    var acc: array<f32, 16>;
    for (var t = 0u; t < 16u; t = t + 1u) {
        acc[t] = 0.0;
    }
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TK) {
        for (var l = 0u; l < 4u; l = l + 1u) {
            let e = tid + l * 256u;
            // Walk A along whichever axis is contiguous in memory.
            var r = e % TM;
            var kk = e / TM;
            if (p.a_sk == 1u) {
                r = e / TK;
                kk = e % TK;
            }
            let gr = row0 + r;
            let gk = k0 + kk;
            var v = 0.0;
            if (gr < p.m && gk < p.k) {
                v = a[abase + gr * p.a_sm + gk * p.a_sk];
            }
            As[kk * TM + r] = v;
        }
        for (var l = 0u; l < 4u; l = l + 1u) {
            let e = tid + l * 256u;
            var cc = e % TN;
            var kk = e / TN;
            if (p.b_sk == 1u) {
                cc = e / TK;
                kk = e % TK;
            }
            let gc = col0 + cc;
            let gk = k0 + kk;
            var v = 0.0;
            if (gc < p.n && gk < p.k) {
                v = load_w(bbase + gk * p.b_sk + gc * p.b_sn) * p.wscale;
            }
            Bs[kk * TN + cc] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            var ar: array<f32, 4>;
            var br: array<f32, 4>;
            for (var i = 0u; i < 4u; i = i + 1u) {
                ar[i] = As[kk * TM + lid.y * 4u + i];
                br[i] = Bs[kk * TN + lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i = i + 1u) {
                for (var j = 0u; j < 4u; j = j + 1u) {
                    acc[i * 4u + j] = acc[i * 4u + j] + ar[i] * br[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i = i + 1u) {
        let r = row0 + lid.y * 4u + i;
        if (r >= p.m) {
            continue;
        }
        for (var j = 0u; j < 4u; j = j + 1u) {
            let cc = col0 + lid.x * 4u + j;
            if (cc < p.n) {
                var v = p.alpha * acc[i * 4u + j];
                if (p.has_bias != 0u) {
                    v = v + bias[p.col0 + cc];
                }
                c[p.c_off + z * p.c_sz + r * p.ldc + p.col0 + cc] = v;
            }
        }
    }
}
