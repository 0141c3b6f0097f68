// Convolution helpers (NCHW): im2col for the GEMM-based conv2d, the per-channel bias fill,
// nearest 2x upsampling and spatial crops.

// col [C*kh*kw, rows*OW] for output rows oh0 .. oh0 + rows of one image x [C, H, W]; padded
// positions are zero.
template <typename T>
__device__ void im2col(T* col, const T* x, u64 c, u64 h, u64 w, u64 kh, u64 kw, u64 oh0,
                       u64 rows, u64 ow, u64 stride, u64 top, u64 left) {
    const u64 plane = rows * ow;
    const u64 n = c * kh * kw * plane;
    FOR_EACH(i, n) {
        const u64 r = i / plane, p = i % plane;
        const u64 ch = r / (kh * kw), ki = (r / kw) % kh, kj = r % kw;
        const long long y = (long long)((oh0 + p / ow) * stride + ki) - (long long)top;
        const long long xx = (long long)((p % ow) * stride + kj) - (long long)left;
        T v = (T)0;
        if (y >= 0 && y < (long long)h && xx >= 0 && xx < (long long)w) {
            v = x[(ch * h + (u64)y) * w + (u64)xx];
        }
        col[i] = v;
    }
}

// out [N, O, plane] = bias[o].
template <typename T>
__device__ void bias_nchw(T* out, const T* bias, u64 o, u64 plane, u64 n) {
    FOR_EACH(i, n) out[i] = bias[(i / plane) % o];
}

template <typename T>
__device__ void upsample2x(T* out, const T* x, u64 planes, u64 h, u64 w) {
    const u64 n = planes * 4 * h * w;
    FOR_EACH(i, n) {
        const u64 ox = i % (2 * w);
        const u64 oy = (i / (2 * w)) % (2 * h);
        const u64 p = i / (4 * h * w);
        out[i] = x[(p * h + oy / 2) * w + ox / 2];
    }
}

template <typename T>
__device__ void crop(T* out, const T* x, u64 planes, u64 h, u64 w, u64 y0, u64 x0, u64 ch,
                     u64 cw) {
    const u64 n = planes * ch * cw;
    FOR_EACH(i, n) {
        const u64 xx = i % cw;
        const u64 y = (i / cw) % ch;
        const u64 p = i / (ch * cw);
        out[i] = x[(p * h + y0 + y) * w + x0 + xx];
    }
}

#define CONV(T, S)                                                                            \
    extern "C" __global__ void im2col_##S(T* col, const T* x, u64 c, u64 h, u64 w, u64 kh,     \
                                          u64 kw, u64 oh0, u64 rows, u64 ow, u64 stride,      \
                                          u64 top, u64 left) {                                \
        im2col<T>(col, x, c, h, w, kh, kw, oh0, rows, ow, stride, top, left);                 \
    }                                                                                         \
    extern "C" __global__ void bias_nchw_##S(T* out, const T* bias, u64 o, u64 plane, u64 n) { \
        bias_nchw<T>(out, bias, o, plane, n);                                                 \
    }                                                                                         \
    extern "C" __global__ void upsample2x_##S(T* out, const T* x, u64 planes, u64 h, u64 w) {  \
        upsample2x<T>(out, x, planes, h, w);                                                  \
    }                                                                                         \
    extern "C" __global__ void crop_##S(T* out, const T* x, u64 planes, u64 h, u64 w, u64 y0,  \
                                        u64 x0, u64 ch, u64 cw) {                             \
        crop<T>(out, x, planes, h, w, y0, x0, ch, cw);                                        \
    }

INSTANTIATE_F32_F64(CONV)
