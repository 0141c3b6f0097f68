// Shared helpers of the CUDA kernels. Prepended to every kernel file before NVRTC compiles it,
// so the kernels need no CUDA headers at run time.
//
// Conventions: element counts are `unsigned long long`; host scalars arrive as `double` and are
// rounded to the compute type once inside the kernel (the CPU backend rounds the same way);
// kernels are instantiated for float and double with the suffixes `_f32` and `_f64`.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define FLUX_INF __int_as_float(0x7f800000)

// Grid-stride loop over `n` elements.
#define FOR_EACH(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (u64)blockDim.x * gridDim.x)

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round-to-nearest-even float -> bf16 (NaN stays NaN).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = ((u32)h >> 10) & 0x1fu;
    u32 man = (u32)h & 0x3ffu;
    if (exp == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (man << 13));
    }
    if (exp == 0) {
        // Subnormal (or zero): man * 2^-24.
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round-to-nearest-even float -> f16 through the hardware conversion instruction.
__device__ __forceinline__ u16 f32_to_f16(float f) {
#ifdef FLUX_CUDA_EMULATOR
    return flux_emu_f32_to_f16(f);  // the CPU test model of the kernels (no PTX there)
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

// fp8 e4m3fn: no infinities, 0x7f / 0xff are NaN.
__device__ __forceinline__ float f8e4m3_to_f32(u8 b) {
    float sign = (b & 0x80u) ? -1.0f : 1.0f;
    int e = (b >> 3) & 0xf;
    int m = b & 0x7;
    if (e == 0xf && m == 7) {
        return __int_as_float(0x7fc00000);
    }
    if (e == 0) {
        return sign * (float)m * 0.001953125f;  // m/8 * 2^-6
    }
    return sign * (1.0f + (float)m * 0.125f) * ldexpf(1.0f, e - 7);
}

template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -FLUX_INF; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -(double)FLUX_INF; }

__device__ __forceinline__ float flux_exp(float x) { return expf(x); }
__device__ __forceinline__ double flux_exp(double x) { return exp(x); }
__device__ __forceinline__ float flux_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double flux_tanh(double x) { return tanh(x); }

__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_max(double v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ double block_sum(double v) {
    __shared__ double part[32];
    __shared__ double total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = (lane < (int)(blockDim.x >> 5)) ? part[lane] : 0.0;
        w = warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

// Maximum over the whole block; every thread gets it.
__device__ double block_max(double v) {
    __shared__ double part[32];
    __shared__ double total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = (lane < (int)(blockDim.x >> 5)) ? part[lane] : -(double)FLUX_INF;
        w = warp_max(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    return total;
}

#define INSTANTIATE_F32_F64(macro) macro(float, f32) macro(double, f64)
