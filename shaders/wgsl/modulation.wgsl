// adaLN modulation `(1 + scale) x + shift` and the gated residual `x + gate y`, with per-batch
// vectors [B, C] (or one shared [C]) broadcast over the L tokens of x [B, L, C].

struct ModParams {
    n: u32,
    l: u32,
    c: u32,
    // Bit 0: first vector shared over the batch; bit 1: second vector shared.
    shared_mask: u32,
}

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<uniform> p: ModParams;

fn vec_index(i: u32, shared_bit: u32) -> u32 {
    let j = i % p.c;
    if ((p.shared_mask & shared_bit) != 0u) {
        return j;
    }
    let bi = i / (p.l * p.c);
    return bi * p.c + j;
}

// u = shift, v = scale.
@compute @workgroup_size(256)
fn modulate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    out[i] = (1.0 + v[vec_index(i, 2u)]) * x[i] + u[vec_index(i, 1u)];
}

// u = y (same shape as x), v = gate.
@compute @workgroup_size(256)
fn gated_add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    out[i] = x[i] + v[vec_index(i, 2u)] * u[i];
}
