// Rotary embedding on interleaved pairs: x [B, L, H, D], table [B or 1, L, D/2, 2] of (cos, sin).
// One thread per pair.

template <typename T>
__device__ void rope(T* out, const T* x, const T* tab, u64 b, u64 l, u64 h, u64 d,
                     int table_shared) {
    const u64 half_d = d / 2;
    const u64 pairs = b * l * h * half_d;
    FOR_EACH(p, pairs) {
        const u64 j = p % half_d;
        const u64 row = p / (h * half_d);  // (bi, li) token index
        const u64 li = row % l;
        const u64 bi = row / l;
        const u64 tb = table_shared ? 0 : bi;
        const T* t = tab + ((tb * l + li) * half_d + j) * 2;
        const T c = t[0], s = t[1];
        const T x0 = x[2 * p], x1 = x[2 * p + 1];
        out[2 * p] = c * x0 - s * x1;
        out[2 * p + 1] = s * x0 + c * x1;
    }
}

#define ROPE(T, S)                                                                            \
    extern "C" __global__ void rope_##S(T* out, const T* x, const T* tab, u64 b, u64 l, u64 h, \
                                        u64 d, int table_shared) {                            \
        rope<T>(out, x, tab, b, l, h, d, table_shared);                                       \
    }

INSTANTIATE_F32_F64(ROPE)
