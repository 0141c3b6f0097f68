// fp8 e4m3fn weights: dequantised to the compute type (with the checkpoint's scale), or to bf16
// for the tensor-core GEMMs (every e4m3 value is exact in bf16; the scale goes into the GEMM's
// alpha there).

template <typename T>
__device__ void dequant_f8e4m3(T* out, const u8* in, float scale, u64 n) {
    FOR_EACH(i, n) out[i] = (T)(f8e4m3_to_f32(in[i]) * scale);
}

extern "C" __global__ void f8e4m3_to_bf16(u16* out, const u8* in, u64 n) {
    FOR_EACH(i, n) out[i] = f32_to_bf16(f8e4m3_to_f32(in[i]));
}

#define FP8(T, S)                                                                             \
    extern "C" __global__ void dequant_f8e4m3_##S(T* out, const u8* in, float scale, u64 n) {  \
        dequant_f8e4m3<T>(out, in, scale, n);                                                 \
    }

INSTANTIATE_F32_F64(FP8)

// fp8 activations for the e4m3 x e4m3 tensor-core GEMM (cuBLASLt), scaled per tensor on the
// device without a host round trip: `max_abs_f32` writes block maxima, `fp8_scale` turns them
// into scale[0] = amax / 448 (the dequantisation factor the GEMM applies to the product) and
// scale[1] = 448 / amax (the quantisation factor), and `quantize_f8e4m3` rounds x * scale[1].

// Nearest e4m3fn value of f (ties to the even code), saturating at +-448 (no infinities in the
// format); NaN gives the NaN code 0x7f with f's sign.
__device__ __forceinline__ u8 f32_to_f8e4m3(float f) {
    const u32 bits = __float_as_uint(f);
    const u8 sign = (u8)((bits >> 24) & 0x80u);
    const u32 mag = bits & 0x7fffffffu;
    if (mag > 0x7f800000u) return (u8)(sign | 0x7fu);
    if (mag >= 0x43e00000u) return (u8)(sign | 0x7eu);  // >= 448 (infinity included)
    if (mag < 0x3c800000u) {
        // Below the smallest normal 2^-6: multiples of 2^-9; 8 * 2^-9 is the smallest normal,
        // whose code is 8 too.
        return (u8)(sign | (u8)rintf(__uint_as_float(mag) * 512.0f));
    }
    // Round the 23-bit mantissa to 3 bits (nearest, ties to even), then rebias 127 -> 7.
    const u32 r = (mag + 0x7ffffu + ((mag >> 20) & 1u)) >> 20;
    return (u8)(sign | (u8)(((r >> 3) - 120u) << 3 | (r & 7u)));
}

extern "C" __global__ void fp8_scale(const double* partial, u64 blocks, float* scale) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double m = 0.0;
    for (u64 i = 0; i < blocks; ++i) m = fmax(m, partial[i]);
    // An all-zero (or non-finite) tensor keeps unit scales.
    if (!(m > 0.0) || !(m <= 3.4028234663852886e38)) m = 448.0;
    scale[0] = (float)(m / 448.0);
    scale[1] = (float)(448.0 / m);
}

extern "C" __global__ void quantize_f8e4m3(u8* out, const float* x, const float* scale, u64 n) {
    const float q = scale[1];
    FOR_EACH(i, n) out[i] = f32_to_f8e4m3(x[i] * q);
}
