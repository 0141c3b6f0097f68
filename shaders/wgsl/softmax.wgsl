// Softmax over the last dim, one workgroup of 256 threads per row: max, sum of exponentials,
// normalise.

struct SoftmaxParams {
    len: u32,
    rows: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<uniform> p: SoftmaxParams;

var<workgroup> sh: array<f32, 256>;

@compute @workgroup_size(256)
fn softmax(
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
    var m = bitcast<f32>(0xff800000u);
    for (var j = t; j < p.len; j = j + 256u) {
        m = max(m, x[base + j]);
    }
    sh[t] = m;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (t < s) {
            sh[t] = max(sh[t], sh[t + s]);
        }
        workgroupBarrier();
    }
    m = sh[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var j = t; j < p.len; j = j + 256u) {
        sum = sum + exp(x[base + j] - m);
    }
    sh[t] = sum;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (t < s) {
            sh[t] = sh[t] + sh[t + s];
        }
        workgroupBarrier();
    }
    sum = sh[0];
    for (var j = t; j < p.len; j = j + 256u) {
        out[base + j] = exp(x[base + j] - m) / sum;
    }
}
