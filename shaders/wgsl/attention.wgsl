// Multi-head attention, flash style: each workgroup owns 64 query rows of one (batch, head);
// key/value tiles of 16 tokens are staged in workgroup memory and folded into a running
// (max, sum, accumulator) per row with an online softmax, so the score matrix never exists.
// q, k, v, out are token-major [B, L, H, D]; D <= 128.

struct AttnParams {
    lq: u32,
    lk: u32,
    h: u32,
    d: u32,
    scale: f32,
    has_bias: u32,
    // Bias [bias_b, bias_h, Lq, Lk] with bias_b in {1, B} and bias_h in {1, H}.
    bias_b: u32,
    bias_h: u32,
}

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<uniform> p: AttnParams;

const BQ: u32 = 64u;
const BK: u32 = 16u;
const DMAX: u32 = 128u;

var<workgroup> ks: array<f32, 2048>; // [BK][D]
var<workgroup> vs: array<f32, 2048>;

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let neg_inf = bitcast<f32>(0xff800000u);
    let bh = wid.y;
    let bi = bh / p.h;
    let hi = bh % p.h;
    let i = wid.x * BQ + lid.x;
    let valid = i < p.lq;
    let hd = p.h * p.d;
    var qr: array<f32, 128>;
    var acc: array<f32, 128>;
    for (var t = 0u; t < p.d; t = t + 1u) {
        acc[t] = 0.0;
        qr[t] = 0.0;
        if (valid) {
            qr[t] = q[(bi * p.lq + i) * hd + hi * p.d + t];
        }
    }
    var bias_row = 0u;
    if (p.has_bias != 0u) {
        var bb = bi;
        if (p.bias_b == 1u) {
            bb = 0u;
        }
        var bhh = hi;
        if (p.bias_h == 1u) {
            bhh = 0u;
        }
        bias_row = ((bb * p.bias_h + bhh) * p.lq + i) * p.lk;
    }
    var m = neg_inf;
    var l = 0.0;
    for (var j0 = 0u; j0 < p.lk; j0 = j0 + BK) {
        let nk = min(BK, p.lk - j0);
        for (var e = lid.x; e < BK * p.d; e = e + BQ) {
            let jj = e / p.d;
            let t = e % p.d;
            if (jj < nk) {
                let off = (bi * p.lk + j0 + jj) * hd + hi * p.d + t;
                ks[jj * p.d + t] = k[off];
                vs[jj * p.d + t] = v[off];
            }
        }
        workgroupBarrier();
        if (valid) {
            var s: array<f32, 16>;
            var mx = m;
            for (var jj = 0u; jj < nk; jj = jj + 1u) {
                var dot = 0.0;
                for (var t = 0u; t < p.d; t = t + 1u) {
                    dot = dot + qr[t] * ks[jj * p.d + t];
                }
                var sc = dot * p.scale;
                if (p.has_bias != 0u) {
                    sc = sc + bias[bias_row + j0 + jj];
                }
                s[jj] = sc;
                mx = max(mx, sc);
            }
            // A tile whose scores are all -inf (masked) changes nothing.
            if (mx != neg_inf) {
                var corr = 0.0;
                if (m != neg_inf) {
                    corr = exp(m - mx);
                }
                var sum = 0.0;
                for (var jj = 0u; jj < nk; jj = jj + 1u) {
                    var e = 0.0;
                    if (s[jj] != neg_inf) {
                        e = exp(s[jj] - mx);
                    }
                    s[jj] = e;
                    sum = sum + e;
                }
                l = l * corr + sum;
                m = mx;
                for (var t = 0u; t < p.d; t = t + 1u) {
                    var a = acc[t] * corr;
                    for (var jj = 0u; jj < nk; jj = jj + 1u) {
                        a = a + s[jj] * vs[jj * p.d + t];
                    }
                    acc[t] = a;
                }
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        let inv = 1.0 / l;
        for (var t = 0u; t < p.d; t = t + 1u) {
            out[(bi * p.lq + i) * hd + hi * p.d + t] = acc[t] * inv;
        }
    }
}
