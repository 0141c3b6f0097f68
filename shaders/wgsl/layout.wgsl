// Strided copy of a view of up to 8 dims: concat, narrow, permute, crop, channel slices and
// nearest upsampling (a source stride of 0 repeats elements) are all this one kernel.

struct CopyParams {
    n: u32,
    rank: u32,
    src_off: u32,
    dst_off: u32,
    shape: array<vec4<u32>, 2>,
    src_stride: array<vec4<u32>, 2>,
    dst_stride: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<storage, read_write> dst: array<f32>;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<uniform> p: CopyParams;

@compute @workgroup_size(256)
fn strided_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    var rem = i;
    var s = p.src_off;
    var d = p.dst_off;
    for (var a = i32(p.rank) - 1; a >= 0; a = a - 1) {
        let ua = u32(a);
        let len = p.shape[ua / 4u][ua % 4u];
        let idx = rem % len;
        rem = rem / len;
        s = s + idx * p.src_stride[ua / 4u][ua % 4u];
        d = d + idx * p.dst_stride[ua / 4u][ua % 4u];
    }
    dst[d] = src[s];
}
