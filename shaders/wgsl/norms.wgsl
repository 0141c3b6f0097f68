// Row norms with one workgroup of 256 threads per row (layer norm, RMS norm, layer norm with
// adaLN modulation) or per group (group norm); statistics reduced in workgroup memory.

struct NormParams {
    // Row length (layer/rms) or group length (group norm).
    len: u32,
    rows: u32,
    eps: f32,
    has_w: u32,
    has_b: u32,
    // Group norm: elements per channel, channels per group, groups, fused swish.
    spatial: u32,
    cpg: u32,
    groups: u32,
    swish: u32,
    // adaLN (mode 3): tokens per batch; whether shift (w) / scale (b) are one shared [C].
    tokens: u32,
    shift_shared: u32,
    scale_shared: u32,
}

// 0: layer norm, 1: RMS norm, 2: group norm, 3: layer norm then adaLN modulation
// (1 + scale) * y + shift, with shift in `w` and scale in `b` ([B, C] or [C]).
override MODE: u32 = 0u;

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<uniform> p: NormParams;

var<workgroup> sh: array<f32, 256>;

fn wg_sum(v: f32, t: u32) -> f32 {
    sh[t] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (t < s) {
            sh[t] = sh[t] + sh[t + s];
        }
        workgroupBarrier();
    }
    let r = sh[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let t = lid.x;
    let base = row * p.len;
    let n = f32(p.len);
    var mean = 0.0;
    if (MODE != 1u) {
        var s = 0.0;
        for (var j = t; j < p.len; j = j + 256u) {
            s = s + x[base + j];
        }
        mean = wg_sum(s, t) / n;
    }
    var s2 = 0.0;
    for (var j = t; j < p.len; j = j + 256u) {
        let d = x[base + j] - mean;
        s2 = s2 + d * d;
    }
    let r = 1.0 / sqrt(wg_sum(s2, t) / n + p.eps);
    for (var j = t; j < p.len; j = j + 256u) {
        let v = x[base + j];
        var y = 0.0;
        if (MODE == 2u) {
            let ch = (row % p.groups) * p.cpg + j / p.spatial;
            var wv = 1.0;
            var bv = 0.0;
            if (p.has_w != 0u) {
                wv = w[ch];
            }
            if (p.has_b != 0u) {
                bv = b[ch];
            }
            y = (v - mean) * (r * wv) + bv;
            if (p.swish != 0u) {
                y = y / (1.0 + exp(-y));
            }
        } else if (MODE == 3u) {
            let bi = row / p.tokens;
            var si = bi * p.len + j;
            if (p.shift_shared != 0u) {
                si = j;
            }
            var ci = bi * p.len + j;
            if (p.scale_shared != 0u) {
                ci = j;
            }
            y = (1.0 + b[ci]) * ((v - mean) * r) + w[si];
        } else {
            y = (v - mean) * r;
            if (p.has_w != 0u) {
                y = y * w[j];
            }
            if (p.has_b != 0u) {
                y = y + b[j];
            }
        }
        out[base + j] = y;
    }
}
