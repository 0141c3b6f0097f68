// Rotary embedding on interleaved pairs: x [B, L, H, D], table [B or 1, L, D/2, 2] of (cos, sin).

struct RopeParams {
    pairs: u32,
    l: u32,
    h: u32,
    d: u32,
    table_shared: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> tab: array<f32>;
@group(0) @binding(3) var<uniform> p: RopeParams;

@compute @workgroup_size(256)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = gid.x + gid.y * nwg.x * 256u;
    if (q >= p.pairs) {
        return;
    }
    let e = 2u * q;
    let row = e / (p.h * p.d);
    let li = row % p.l;
    let bi = row / p.l;
    let j = (e % p.d) / 2u;
    var tb = bi;
    if (p.table_shared != 0u) {
        tb = 0u;
    }
    let t = ((tb * p.l + li) * (p.d / 2u) + j) * 2u;
    let c = tab[t];
    let s = tab[t + 1u];
    let x0 = x[e];
    let x1 = x[e + 1u];
    out[e] = c * x0 - s * x1;
    out[e + 1u] = s * x0 + c * x1;
}
