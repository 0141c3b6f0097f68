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
