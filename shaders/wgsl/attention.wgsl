// Multi-head attention, flash style: each workgroup owns 64 query rows of one (batch, head);
// key/value tiles of 16 tokens are staged in workgroup memory and folded into a running
// (max, sum, accumulator) per row with an online softmax, so the score matrix never exists.
// q, k, v, out are token-major [B, L, H, D]; D <= 128.
//
// Rows are held as vec4 (zero-padded past D) and a tile's 16 keys are handled in one loop
// iteration, so one invocation runs few loop iterations per tile: software rasterisers such as
// llvmpipe stop an invocation's loops after 65,535 iterations in all, which with this layout is
// past 20,000 keys at D = 128.

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
// Most vec4s in a row (D <= 128).
const D4: u32 = 32u;

var<workgroup> ks: array<vec4<f32>, 512>; // [BK][D4]
var<workgroup> vs: array<vec4<f32>, 512>;

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let neg_inf = bitcast<f32>(0xff800000u);
    let bh = wid.y;
    let bi = bh / p.h;
    let hi = bh % p.h;
    let i = wid.x * BQ + lid.x;
    let valid = i < p.lq;
    let hd = p.h * p.d;
    let d4 = (p.d + 3u) / 4u;
    var qr: array<vec4<f32>, 32>;
    var acc: array<vec4<f32>, 32>;
    let qbase = (bi * p.lq + min(i, p.lq - 1u)) * hd + hi * p.d;
    let qlast = qbase + p.d - 1u;
    for (var t4 = 0u; t4 < d4; t4 = t4 + 1u) {
        let t = 4u * t4;
        acc[t4] = vec4<f32>(0.0);
        qr[t4] = vec4<f32>(
            select(0.0, q[min(qbase + t, qlast)], t < p.d),
            select(0.0, q[min(qbase + t + 1u, qlast)], t + 1u < p.d),
            select(0.0, q[min(qbase + t + 2u, qlast)], t + 2u < p.d),
            select(0.0, q[min(qbase + t + 3u, qlast)], t + 3u < p.d),
        );
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
        bias_row = ((bb * p.bias_h + bhh) * p.lq + min(i, p.lq - 1u)) * p.lk;
    }
    let ninf4 = vec4<f32>(neg_inf);
    var m = neg_inf;
    var l = 0.0;
    for (var j0 = 0u; j0 < p.lk; j0 = j0 + BK) {
        let nk = min(BK, p.lk - j0);
        // Stage the tile; rows past the last key are zero.
        for (var e = lid.x; e < BK * d4; e = e + BQ) {
            let jj = e / d4;
            let t = 4u * (e % d4);
            var kv = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            if (jj < nk) {
                let base = (bi * p.lk + j0 + jj) * hd + hi * p.d;
                let last = base + p.d - 1u;
                kv = vec4<f32>(
                    select(0.0, k[min(base + t, last)], t < p.d),
                    select(0.0, k[min(base + t + 1u, last)], t + 1u < p.d),
                    select(0.0, k[min(base + t + 2u, last)], t + 2u < p.d),
                    select(0.0, k[min(base + t + 3u, last)], t + 3u < p.d),
                );
                vv = vec4<f32>(
                    select(0.0, v[min(base + t, last)], t < p.d),
                    select(0.0, v[min(base + t + 1u, last)], t + 1u < p.d),
                    select(0.0, v[min(base + t + 2u, last)], t + 2u < p.d),
                    select(0.0, v[min(base + t + 3u, last)], t + 3u < p.d),
                );
            }
            ks[jj * D4 + e % d4] = kv;
            vs[jj * D4 + e % d4] = vv;
        }
        workgroupBarrier();
        if (valid) {
            // Scores of keys 0-3, 4-7, 8-11 and 12-15 of the tile.
            var s0 = vec4<f32>(0.0);
            var s1 = vec4<f32>(0.0);
            var s2 = vec4<f32>(0.0);
            var s3 = vec4<f32>(0.0);
            for (var t4 = 0u; t4 < d4; t4 = t4 + 1u) {
                let qv = qr[t4];
                s0 = s0 + vec4<f32>(dot(qv, ks[t4]), dot(qv, ks[D4 + t4]),
                    dot(qv, ks[2u * D4 + t4]), dot(qv, ks[3u * D4 + t4]));
                s1 = s1 + vec4<f32>(dot(qv, ks[4u * D4 + t4]), dot(qv, ks[5u * D4 + t4]),
                    dot(qv, ks[6u * D4 + t4]), dot(qv, ks[7u * D4 + t4]));
                s2 = s2 + vec4<f32>(dot(qv, ks[8u * D4 + t4]), dot(qv, ks[9u * D4 + t4]),
                    dot(qv, ks[10u * D4 + t4]), dot(qv, ks[11u * D4 + t4]));
                s3 = s3 + vec4<f32>(dot(qv, ks[12u * D4 + t4]), dot(qv, ks[13u * D4 + t4]),
                    dot(qv, ks[14u * D4 + t4]), dot(qv, ks[15u * D4 + t4]));
            }
            s0 = s0 * p.scale;
            s1 = s1 * p.scale;
            s2 = s2 * p.scale;
            s3 = s3 * p.scale;
            if (p.has_bias != 0u) {
                var b: array<f32, 16>;
                for (var jj = 0u; jj < BK; jj = jj + 1u) {
                    b[jj] = 0.0;
                    if (jj < nk) {
                        b[jj] = bias[bias_row + j0 + jj];
                    }
                }
                s0 = s0 + vec4<f32>(b[0], b[1], b[2], b[3]);
                s1 = s1 + vec4<f32>(b[4], b[5], b[6], b[7]);
                s2 = s2 + vec4<f32>(b[8], b[9], b[10], b[11]);
                s3 = s3 + vec4<f32>(b[12], b[13], b[14], b[15]);
            }
            // Keys past the end of the tile are masked out.
            let key = vec4<u32>(0u, 1u, 2u, 3u);
            s0 = select(ninf4, s0, key < vec4<u32>(nk));
            s1 = select(ninf4, s1, key + 4u < vec4<u32>(nk));
            s2 = select(ninf4, s2, key + 8u < vec4<u32>(nk));
            s3 = select(ninf4, s3, key + 12u < vec4<u32>(nk));
            let m4 = max(max(s0, s1), max(s2, s3));
            let mx = max(m, max(max(m4.x, m4.y), max(m4.z, m4.w)));
            // A tile whose scores are all -inf (masked) changes nothing.
            if (mx != neg_inf) {
                var corr = 0.0;
                if (m != neg_inf) {
                    corr = exp(m - mx);
                }
                let mx4 = vec4<f32>(mx);
                let e0 = select(exp(s0 - mx4), vec4<f32>(0.0), s0 == ninf4);
                let e1 = select(exp(s1 - mx4), vec4<f32>(0.0), s1 == ninf4);
                let e2 = select(exp(s2 - mx4), vec4<f32>(0.0), s2 == ninf4);
                let e3 = select(exp(s3 - mx4), vec4<f32>(0.0), s3 == ninf4);
                l = l * corr + dot((e0 + e1) + (e2 + e3), vec4<f32>(1.0));
                m = mx;
                for (var t4 = 0u; t4 < d4; t4 = t4 + 1u) {
                    var a = acc[t4] * corr;
                    a = a + e0.x * vs[t4] + e0.y * vs[D4 + t4] + e0.z * vs[2u * D4 + t4]
                        + e0.w * vs[3u * D4 + t4];
                    a = a + e1.x * vs[4u * D4 + t4] + e1.y * vs[5u * D4 + t4]
                        + e1.z * vs[6u * D4 + t4] + e1.w * vs[7u * D4 + t4];
                    a = a + e2.x * vs[8u * D4 + t4] + e2.y * vs[9u * D4 + t4]
                        + e2.z * vs[10u * D4 + t4] + e2.w * vs[11u * D4 + t4];
                    a = a + e3.x * vs[12u * D4 + t4] + e3.y * vs[13u * D4 + t4]
                        + e3.z * vs[14u * D4 + t4] + e3.w * vs[15u * D4 + t4];
                    acc[t4] = a;
                }
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        let inv = 1.0 / l;
        let obase = (bi * p.lq + i) * hd + hi * p.d;
        for (var t4 = 0u; t4 < d4; t4 = t4 + 1u) {
            let a = acc[t4] * inv;
            let t = 4u * t4;
            out[obase + t] = a.x;
            if (t + 1u < p.d) {
                out[obase + t + 1u] = a.y;
            }
            if (t + 2u < p.d) {
                out[obase + t + 2u] = a.z;
            }
            if (t + 3u < p.d) {
                out[obase + t + 3u] = a.w;
            }
        }
    }
}
