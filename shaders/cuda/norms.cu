// Normalisations: one block per row (layer / RMS norm) or per group (group norm); statistics
// accumulate in f64 as on the CPU backend, the normalisation itself runs in T.

// The block's row statistics for a layer norm: mean m and 1 / sqrt(var + eps) r, accumulated
// in f64 and rounded to T once.
template <typename T>
__device__ void layer_norm_stats(const T* row, u64 c, double eps, T& m, T& r) {
    double s = 0.0;
    for (u64 j = threadIdx.x; j < c; j += blockDim.x) s += (double)row[j];
    const double mean = block_sum(s) / (double)c;
    double v = 0.0;
    for (u64 j = threadIdx.x; j < c; j += blockDim.x) {
        double d = (double)row[j] - mean;
        v += d * d;
    }
    const double var = block_sum(v) / (double)c;
    r = (T)(1.0 / sqrt(var + eps));
    m = (T)mean;
}

template <typename T>
__device__ void layer_norm(T* out, const T* x, const T* w, const T* b, u64 c, double eps,
                           int has_w, int has_b) {
    const T* row = x + (u64)blockIdx.x * c;
    T* o = out + (u64)blockIdx.x * c;
    T m, r;
    layer_norm_stats(row, c, eps, m, r);
    for (u64 j = threadIdx.x; j < c; j += blockDim.x) {
        T y = (row[j] - m) * r;
        if (has_w) y = y * w[j];
        if (has_b) y = y + b[j];
        o[j] = y;
    }
}

template <typename T>
__device__ void rms_norm(T* out, const T* x, const T* scale, u64 c, double eps, int has_scale) {
    const T* row = x + (u64)blockIdx.x * c;
    T* o = out + (u64)blockIdx.x * c;
    double s = 0.0;
    for (u64 j = threadIdx.x; j < c; j += blockDim.x) {
        double v = (double)row[j];
        s += v * v;
    }
    const double ms = block_sum(s) / (double)c;
    const T r = (T)(1.0 / sqrt(ms + eps));
    for (u64 j = threadIdx.x; j < c; j += blockDim.x) {
        o[j] = has_scale ? row[j] * r * scale[j] : row[j] * r;
    }
}

// One block per (image, group): `glen = cpg * spatial` contiguous elements.
template <typename T>
__device__ void group_norm(T* out, const T* x, const T* w, const T* b, u64 spatial, u64 cpg,
                           u64 groups, double eps, int has_w, int has_b, int swish) {
    const u64 glen = cpg * spatial;
    const T* src = x + (u64)blockIdx.x * glen;
    T* dst = out + (u64)blockIdx.x * glen;
    double s = 0.0;
    for (u64 j = threadIdx.x; j < glen; j += blockDim.x) s += (double)src[j];
    const double mean = block_sum(s) / (double)glen;
    double v = 0.0;
    for (u64 j = threadIdx.x; j < glen; j += blockDim.x) {
        double d = (double)src[j] - mean;
        v += d * d;
    }
    const double rstd = 1.0 / sqrt(block_sum(v) / (double)glen + eps);
    const u64 c0 = ((u64)blockIdx.x % groups) * cpg;
    for (u64 j = threadIdx.x; j < glen; j += blockDim.x) {
        const u64 ch = c0 + j / spatial;
        const double wv = has_w ? (double)w[ch] : 1.0;
        const double bv = has_b ? (double)b[ch] : 0.0;
        // y = x * a + b with the normalisation folded into one multiply-add, as on the CPU.
        const T a = (T)(rstd * wv);
        const T bb = (T)(bv - mean * rstd * wv);
        T y = src[j] * a + bb;
        if (swish) y = y / ((T)1 + flux_exp((T)0 - y));
        dst[j] = y;
    }
}

// adaLN in one pass: out = (1 + scale) * layer_norm(x) + shift over rows of x [B, L, C], one
// block per row, with the per-batch [B, C] (or shared [C]) vectors of `modulate` and the same
// roundings as layer_norm (no affine) followed by modulate.
template <typename T>
__device__ void layer_norm_modulate(T* out, const T* x, const T* shift, const T* scale, u64 c,
                                    u64 l, double eps, int shift_shared, int scale_shared) {
    const u64 row_id = (u64)blockIdx.x;
    const T* row = x + row_id * c;
    T* o = out + row_id * c;
    T m, r;
    layer_norm_stats(row, c, eps, m, r);
    const u64 bi = row_id / l;
    const T* sh = shift + (shift_shared ? 0 : bi * c);
    const T* sc = scale + (scale_shared ? 0 : bi * c);
    for (u64 j = threadIdx.x; j < c; j += blockDim.x) {
        const T y = (row[j] - m) * r;
        o[j] = ((T)1 + sc[j]) * y + sh[j];
    }
}

#define NORMS(T, S)                                                                           \
    extern "C" __global__ void layer_norm_##S(T* out, const T* x, const T* w, const T* b,      \
                                              u64 c, double eps, int has_w, int has_b) {      \
        layer_norm<T>(out, x, w, b, c, eps, has_w, has_b);                                    \
    }                                                                                         \
    extern "C" __global__ void rms_norm_##S(T* out, const T* x, const T* scale, u64 c,         \
                                            double eps, int has_scale) {                      \
        rms_norm<T>(out, x, scale, c, eps, has_scale);                                        \
    }                                                                                         \
    extern "C" __global__ void group_norm_##S(T* out, const T* x, const T* w, const T* b,      \
                                              u64 spatial, u64 cpg, u64 groups, double eps,   \
                                              int has_w, int has_b, int swish) {              \
        group_norm<T>(out, x, w, b, spatial, cpg, groups, eps, has_w, has_b, swish);          \
    }                                                                                         \
    extern "C" __global__ void layer_norm_modulate_##S(T* out, const T* x, const T* shift,     \
                                                       const T* scale, u64 c, u64 l,          \
                                                       double eps, int shift_shared,          \
                                                       int scale_shared) {                    \
        layer_norm_modulate<T>(out, x, shift, scale, c, l, eps, shift_shared, scale_shared);  \
    }

INSTANTIATE_F32_F64(NORMS)
