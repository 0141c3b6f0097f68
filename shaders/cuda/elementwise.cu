// Elementwise kernels: the samplers' fused linear combination, affine, binary ops.

// out = [a * out +] sum_k c_k * t_k with up to six terms. Unused term pointers may alias
// anything; only the first `terms` are read. Each coefficient is rounded to T once.
template <typename T>
__device__ void lincomb(T* out, const T* t0, const T* t1, const T* t2, const T* t3,
                        const T* t4, const T* t5, double c0, double c1, double c2, double c3,
                        double c4, double c5, int terms, int has_a, double a, u64 n) {
    const T c[6] = {(T)c0, (T)c1, (T)c2, (T)c3, (T)c4, (T)c5};
    const T* t[6] = {t0, t1, t2, t3, t4, t5};
    const T av = (T)a;
    FOR_EACH(i, n) {
        T acc;
        int k = 0;
        if (has_a) {
            acc = av * out[i];
        } else if (terms > 0) {
            acc = c[0] * t[0][i];
            k = 1;
        } else {
            acc = (T)0;
        }
        for (; k < terms; ++k) acc = acc + c[k] * t[k][i];
        out[i] = acc;
    }
}

template <typename T>
__device__ void affine(T* out, const T* x, double mul, double add, u64 n) {
    const T m = (T)mul, a = (T)add;
    FOR_EACH(i, n) out[i] = x[i] * m + a;
}

// out = a op b where b (length nb) repeats over a's leading dims. op: 0 add, 1 sub, 2 mul.
template <typename T>
__device__ void binary(T* out, const T* a, const T* b, u64 n, u64 nb, int op) {
    FOR_EACH(i, n) {
        T x = a[i], y = b[i % nb];
        out[i] = op == 0 ? x + y : (op == 1 ? x - y : x * y);
    }
}

#define ELEMENTWISE(T, S)                                                                     \
    extern "C" __global__ void lincomb_##S(T* out, const T* t0, const T* t1, const T* t2,      \
                                           const T* t3, const T* t4, const T* t5, double c0,   \
                                           double c1, double c2, double c3, double c4,         \
                                           double c5, int terms, int has_a, double a, u64 n) { \
        lincomb<T>(out, t0, t1, t2, t3, t4, t5, c0, c1, c2, c3, c4, c5, terms, has_a, a, n);   \
    }                                                                                         \
    extern "C" __global__ void affine_##S(T* out, const T* x, double mul, double add, u64 n) { \
        affine<T>(out, x, mul, add, n);                                                       \
    }                                                                                         \
    extern "C" __global__ void binary_##S(T* out, const T* a, const T* b, u64 n, u64 nb,       \
                                          int op) {                                           \
        binary<T>(out, a, b, n, nb, op);                                                      \
    }

INSTANTIATE_F32_F64(ELEMENTWISE)
