// Casts: stored weights (f32, f64, bf16, f16; little-endian as in the checkpoint) widened to the
// compute type with the checkpoint's scale, and f32 activations narrowed to bf16 / f16 for the
// tensor-core GEMMs.

template <typename T>
__device__ void widen_f32(T* out, const float* in, float scale, u64 n) {
    FOR_EACH(i, n) out[i] = (T)(in[i] * scale);
}

template <typename T>
__device__ void widen_f64(T* out, const double* in, float scale, u64 n) {
    FOR_EACH(i, n) out[i] = (T)(in[i] * (double)scale);
}

template <typename T>
__device__ void widen_bf16(T* out, const u16* in, float scale, u64 n) {
    FOR_EACH(i, n) out[i] = (T)(bf16_to_f32(in[i]) * scale);
}

template <typename T>
__device__ void widen_f16(T* out, const u16* in, float scale, u64 n) {
    FOR_EACH(i, n) out[i] = (T)(f16_to_f32(in[i]) * scale);
}

extern "C" __global__ void narrow_f32_to_bf16(u16* out, const float* in, u64 n) {
    FOR_EACH(i, n) out[i] = f32_to_bf16(in[i]);
}

extern "C" __global__ void narrow_f32_to_f16(u16* out, const float* in, u64 n) {
    FOR_EACH(i, n) out[i] = f32_to_f16(in[i]);
}

#define CASTS(T, S)                                                                           \
    extern "C" __global__ void widen_f32_##S(T* out, const float* in, float scale, u64 n) {    \
        widen_f32<T>(out, in, scale, n);                                                      \
    }                                                                                         \
    extern "C" __global__ void widen_f64_##S(T* out, const double* in, float scale, u64 n) {   \
        widen_f64<T>(out, in, scale, n);                                                      \
    }                                                                                         \
    extern "C" __global__ void widen_bf16_##S(T* out, const u16* in, float scale, u64 n) {     \
        widen_bf16<T>(out, in, scale, n);                                                     \
    }                                                                                         \
    extern "C" __global__ void widen_f16_##S(T* out, const u16* in, float scale, u64 n) {      \
        widen_f16<T>(out, in, scale, n);                                                      \
    }

INSTANTIATE_F32_F64(CASTS)
