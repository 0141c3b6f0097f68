// Widening casts: a packed weight (f32, f16, bf16, fp8) to f32 activations, times its scale.
// Also gathers embedding rows from a packed table.

struct CastParams {
    n: u32,
    dst_off: u32,
    scale: f32,
    row_len: u32,
}

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> wbuf: array<u32>;
@group(0) @binding(2) var<uniform> p: CastParams;

@compute @workgroup_size(256)
fn widen(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    out[p.dst_off + i] = load_w(i) * p.scale;
}

@group(0) @binding(3) var<storage, read> ids: array<u32>;

// out[r, j] = table[ids[r], j] for n = rows * row_len outputs.
@compute @workgroup_size(256)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let r = i / p.row_len;
    let j = i % p.row_len;
    out[p.dst_off + i] = load_w(ids[r] * p.row_len + j) * p.scale;
}
