// adaLN modulation and gated residuals over x [B, L, C] with per-batch vectors [B, C] (or one
// shared [C] vector).

template <typename T>
__device__ void modulate(T* out, const T* x, const T* shift, const T* scale, u64 l, u64 c,
                         u64 n, int shift_shared, int scale_shared) {
    FOR_EACH(i, n) {
        const u64 j = i % c;
        const u64 bi = i / (l * c);
        const T sh = shift[shift_shared ? j : bi * c + j];
        const T sc = scale[scale_shared ? j : bi * c + j];
        out[i] = ((T)1 + sc) * x[i] + sh;
    }
}

template <typename T>
__device__ void gated_add(T* out, const T* x, const T* y, const T* gate, u64 l, u64 c, u64 n,
                          int gate_shared) {
    FOR_EACH(i, n) {
        const u64 j = i % c;
        const u64 bi = i / (l * c);
        out[i] = x[i] + gate[gate_shared ? j : bi * c + j] * y[i];
    }
}

#define MODULATION(T, S)                                                                      \
    extern "C" __global__ void modulate_##S(T* out, const T* x, const T* shift,                \
                                            const T* scale, u64 l, u64 c, u64 n,              \
                                            int shift_shared, int scale_shared) {             \
        modulate<T>(out, x, shift, scale, l, c, n, shift_shared, scale_shared);               \
    }                                                                                         \
    extern "C" __global__ void gated_add_##S(T* out, const T* x, const T* y, const T* gate,    \
                                             u64 l, u64 c, u64 n, int gate_shared) {          \
        gated_add<T>(out, x, y, gate, l, c, n, gate_shared);                                  \
    }

INSTANTIATE_F32_F64(MODULATION)
