// Reductions: each workgroup folds 1024 elements to one partial (tree in workgroup memory);
// the host adds the partials in f64.

struct ReduceParams {
    n: u32,
    atol: f32,
    rtol: f32,
    pad: u32,
}

// 0: sum of squares, 1: max |x|, 2: sum of (e / max(atol, rtol max(|a|, |b|)))^2.
override MODE: u32 = 0u;

@group(0) @binding(0) var<storage, read_write> partials: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<uniform> p: ReduceParams;

var<workgroup> sh: array<f32, 256>;

fn term(i: u32) -> f32 {
    switch MODE {
        case 1u: {
            return abs(x[i]);
        }
        case 2u: {
            let delta = max(p.atol, p.rtol * max(abs(a[i]), abs(b[i])));
            let r = x[i] / delta;
            return r * r;
        }
        default: {
            let v = x[i];
            return v * v;
        }
    }
}

@compute @workgroup_size(256)
fn reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let g = wid.x + wid.y * nwg.x;
    let base = g * 1024u;
    var acc = 0.0;
    for (var k = 0u; k < 4u; k = k + 1u) {
        let i = base + k * 256u + lid.x;
        if (i < p.n) {
            let t = term(i);
            acc = select(acc + t, max(acc, t), MODE == 1u);
        }
    }
    sh[lid.x] = acc;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (lid.x < s) {
            let o = sh[lid.x + s];
            sh[lid.x] = select(sh[lid.x] + o, max(sh[lid.x], o), MODE == 1u);
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        partials[g] = sh[0];
    }
}
