// Softmax over the last dim, one block per row: e = exp(x - max), then e * (1 / sum(e)).

template <typename T>
__device__ void softmax(T* out, const T* x, u64 c) {
    const T* row = x + (u64)blockIdx.x * c;
    T* o = out + (u64)blockIdx.x * c;
    double m = -(double)FLUX_INF;
    for (u64 j = threadIdx.x; j < c; j += blockDim.x) m = fmax(m, (double)row[j]);
    const T mx = (T)block_max(m);
    double s = 0.0;
    for (u64 j = threadIdx.x; j < c; j += blockDim.x) {
        T e = flux_exp(row[j] - mx);
        o[j] = e;
        s += (double)e;
    }
    const T inv = (T)1 / (T)block_sum(s);
    for (u64 j = threadIdx.x; j < c; j += blockDim.x) o[j] = o[j] * inv;
}

#define SOFTMAX(T, S)                                                                         \
    extern "C" __global__ void softmax_##S(T* out, const T* x, u64 c) { softmax<T>(out, x, c); }

INSTANTIATE_F32_F64(SOFTMAX)
