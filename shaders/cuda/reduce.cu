// Reductions: each block writes one f64 partial result; the host adds the (few) partials.

template <typename T>
__device__ void sum_squares(const T* x, u64 n, double* partial) {
    double acc = 0.0;
    FOR_EACH(i, n) {
        double v = (double)x[i];
        acc += v * v;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename T>
__device__ void max_abs(const T* x, u64 n, double* partial) {
    double acc = 0.0;
    FOR_EACH(i, n) acc = fmax(acc, fabs((double)x[i]));
    acc = block_max(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Sum of (e / max(atol, rtol * max(|a|, |b|)))^2, the ratio formed in T as on the CPU.
template <typename T>
__device__ void scaled_error_sq(const T* e, const T* a, const T* b, double atol, double rtol,
                                u64 n, double* partial) {
    const T at = (T)atol, rt = (T)rtol;
    double acc = 0.0;
    FOR_EACH(i, n) {
        T aa = a[i] < (T)0 ? -a[i] : a[i];
        T bb = b[i] < (T)0 ? -b[i] : b[i];
        T m = aa >= bb ? aa : bb;
        T s = rt * m;
        T delta = at >= s ? at : s;
        double r = (double)(e[i] / delta);
        acc += r * r;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

#define REDUCE(T, S)                                                                          \
    extern "C" __global__ void sum_squares_##S(const T* x, u64 n, double* partial) {          \
        sum_squares<T>(x, n, partial);                                                        \
    }                                                                                         \
    extern "C" __global__ void max_abs_##S(const T* x, u64 n, double* partial) {              \
        max_abs<T>(x, n, partial);                                                            \
    }                                                                                         \
    extern "C" __global__ void scaled_error_sq_##S(const T* e, const T* a, const T* b,         \
                                                   double atol, double rtol, u64 n,           \
                                                   double* partial) {                         \
        scaled_error_sq<T>(e, a, b, atol, rtol, n, partial);                                  \
    }

INSTANTIATE_F32_F64(REDUCE)
