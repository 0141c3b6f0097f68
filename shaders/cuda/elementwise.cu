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

// Two combinations of the same operands (a corrector and the next step's predictor):
// first = sum_k a_k * t_k, then second = link * first + sum_k b_k * t_k, one thread writing both
// values of its element. 1 to 5 terms; unused pointers may alias anything.
template <typename T>
__device__ void lincomb_pair(T* first, T* second, const T* t0, const T* t1, const T* t2,
                             const T* t3, const T* t4, double a0, double a1, double a2,
                             double a3, double a4, double link, double b0, double b1, double b2,
                             double b3, double b4, int terms, u64 n) {
    const T a[5] = {(T)a0, (T)a1, (T)a2, (T)a3, (T)a4};
    const T b[5] = {(T)b0, (T)b1, (T)b2, (T)b3, (T)b4};
    const T* t[5] = {t0, t1, t2, t3, t4};
    const T lk = (T)link;
    FOR_EACH(i, n) {
        T v[5];
        for (int k = 0; k < terms; ++k) v[k] = t[k][i];
        T acc = a[0] * v[0];
        for (int k = 1; k < terms; ++k) acc = acc + a[k] * v[k];
        first[i] = acc;
        T acc2 = lk * acc;
        for (int k = 0; k < terms; ++k) acc2 = acc2 + b[k] * v[k];
        second[i] = acc2;
    }
}

// The multistep samplers' step: d = a x + b den into `d`, then x = x + c d + sum_k c_k h_k in
// place (0 to 4 history terms), one thread per element. Unused pointers may alias anything.
template <typename T>
__device__ void derivative_step(T* x, T* d, const T* den, const T* h0, const T* h1, const T* h2,
                                const T* h3, double a, double b, double c, double c0, double c1,
                                double c2, double c3, int history, u64 n) {
    const T ch[4] = {(T)c0, (T)c1, (T)c2, (T)c3};
    const T* h[4] = {h0, h1, h2, h3};
    const T av = (T)a, bv = (T)b, cv = (T)c;
    FOR_EACH(i, n) {
        const T xv = x[i];
        const T dv = av * xv + bv * den[i];
        d[i] = dv;
        T acc = (T)1 * xv;
        acc = acc + cv * dv;
        for (int k = 0; k < history; ++k) acc = acc + ch[k] * h[k][i];
        x[i] = acc;
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
    extern "C" __global__ void lincomb_pair_##S(                                              \
        T* first, T* second, const T* t0, const T* t1, const T* t2, const T* t3, const T* t4,  \
        double a0, double a1, double a2, double a3, double a4, double link, double b0,         \
        double b1, double b2, double b3, double b4, int terms, u64 n) {                        \
        lincomb_pair<T>(first, second, t0, t1, t2, t3, t4, a0, a1, a2, a3, a4, link, b0, b1,   \
                        b2, b3, b4, terms, n);                                                 \
    }                                                                                         \
    extern "C" __global__ void derivative_step_##S(                                           \
        T* x, T* d, const T* den, const T* h0, const T* h1, const T* h2, const T* h3, double a, \
        double b, double c, double c0, double c1, double c2, double c3, int history, u64 n) {  \
        derivative_step<T>(x, d, den, h0, h1, h2, h3, a, b, c, c0, c1, c2, c3, history, n);    \
    }                                                                                         \
    extern "C" __global__ void affine_##S(T* out, const T* x, double mul, double add, u64 n) { \
        affine<T>(out, x, mul, add, n);                                                       \
    }                                                                                         \
    extern "C" __global__ void binary_##S(T* out, const T* a, const T* b, u64 n, u64 nb,       \
                                          int op) {                                           \
        binary<T>(out, a, b, n, nb, op);                                                      \
    }

INSTANTIATE_F32_F64(ELEMENTWISE)
