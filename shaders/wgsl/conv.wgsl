// Image kernels: 2-D convolution as an implicit GEMM (no im2col buffer) with the same 64x64
// tiling and 4x4 register blocking as matmul.wgsl. Rows = output channels, columns = output
// pixels, K = C * kh * kw; the input patch is gathered while loading the tile.
// Upsampling, crops and channel slices are strided copies (layout.wgsl).

struct ConvParams {
    c: u32,
    h: u32,
    w: u32,
    o: u32,
    kh: u32,
    kw: u32,
    oh: u32,
    ow: u32,
    stride: u32,
    top: u32,
    left: u32,
    has_bias: u32,
    wscale: f32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> wbuf: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<uniform> p: ConvParams;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> As: array<f32, 1024>; // weights [TK][TM]
var<workgroup> Bs: array<f32, 1024>; // input patches [TK][TN]

@compute @workgroup_size(16, 16)
fn conv2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let img = wid.z;
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let tid = lid.y * 16u + lid.x;
    let kdim = p.c * p.kh * p.kw;
    let npix = p.oh * p.ow;
    let xbase = img * p.c * p.h * p.w;
    var acc: array<f32, 16>;
    for (var t = 0u; t < 16u; t = t + 1u) {
        acc[t] = 0.0;
    }
    for (var k0 = 0u; k0 < kdim; k0 = k0 + TK) {
        for (var l = 0u; l < 4u; l = l + 1u) {
            let e = tid + l * 256u;
            let r = e / TK;
            let kk = e % TK;
            let gr = row0 + r;
            let gk = k0 + kk;
            var v = 0.0;
            if (gr < p.o && gk < kdim) {
                v = load_w(gr * kdim + gk) * p.wscale;
            }
            As[kk * TM + r] = v;
        }
        for (var l = 0u; l < 4u; l = l + 1u) {
            let e = tid + l * 256u;
            let cc = e % TN;
            let kk = e / TN;
            let pix = col0 + cc;
            let gk = k0 + kk;
            var v = 0.0;
            if (pix < npix && gk < kdim) {
                let ch = gk / (p.kh * p.kw);
                let ki = (gk / p.kw) % p.kh;
                let kj = gk % p.kw;
                let y = i32((pix / p.ow) * p.stride + ki) - i32(p.top);
                let xx = i32((pix % p.ow) * p.stride + kj) - i32(p.left);
                if (y >= 0 && y < i32(p.h) && xx >= 0 && xx < i32(p.w)) {
                    v = x[xbase + (ch * p.h + u32(y)) * p.w + u32(xx)];
                }
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
        if (r >= p.o) {
            continue;
        }
        var b = 0.0;
        if (p.has_bias != 0u) {
            b = bias[r];
        }
        for (var j = 0u; j < 4u; j = j + 1u) {
            let pix = col0 + lid.x * 4u + j;
            if (pix < npix) {
                out[(img * p.o + r) * npix + pix] = acc[i * 4u + j] + b;
            }
        }
    }
}
