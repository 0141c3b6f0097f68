// Pointwise activations. kind: 0 SiLU, 1 GELU (tanh), 2 GELU (erf), 3 QuickGELU, 4 ReLU.

template <typename T>
__device__ T activate(T x, int kind) {
    switch (kind) {
        case 0:
            return x / ((T)1 + flux_exp(-x));
        case 1: {
            const T c = (T)0.7978845608028654;  // sqrt(2 / pi)
            const T k = (T)0.044715;
            return (T)0.5 * x * ((T)1 + flux_tanh(c * (x + k * x * x * x)));
        }
        case 2:
            // erf in f64 for both types, as the CPU reference computes it.
            return (T)0.5 * x * ((T)1 + (T)erf((double)x * 0.7071067811865476));
        case 3:
            return x / ((T)1 + flux_exp(-((T)1.702 * x)));
        default:
            return x > (T)0 ? x : (T)0;
    }
}

template <typename T>
__device__ void activation(T* out, const T* x, u64 n, int kind) {
    FOR_EACH(i, n) out[i] = activate<T>(x[i], kind);
}

#define ACTIVATIONS(T, S)                                                                     \
    extern "C" __global__ void activation_##S(T* out, const T* x, u64 n, int kind) {          \
        activation<T>(out, x, n, kind);                                                       \
    }

INSTANTIATE_F32_F64(ACTIVATIONS)
