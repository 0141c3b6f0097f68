// The cuBLAS and cuBLASLt half of the CPU stand-in for the CUDA libraries (see driver.cpp): the
// GEMM entry points the backend calls, computed in double from the documented column-major
// semantics, with the operand types it uses (f32, f64, f16, bf16, fp8 e4m3 inputs; f32 / f64
// outputs) and cuBLASLt's bias and GELU epilogues and per-tensor scale pointers. Every operand's
// extent is checked against the driver's allocations. Requests outside what is modelled are
// refused with CUBLAS_STATUS_NOT_SUPPORTED, as cuBLASLt refuses what a device cannot do; the
// fp8 rules of cuBLASLt (A transposed and B not, the "TN" layout; sizes and leading dimensions
// multiples of 16) are enforced, since the backend must fall back when they are not met.

#include "model.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

using Status = int;
constexpr Status OK = 0;
constexpr Status NOT_INITIALIZED = 1;
constexpr Status INVALID_VALUE = 7;
constexpr Status EXECUTION_FAILED = 13;
constexpr Status NOT_SUPPORTED = 15;

// cudaDataType
constexpr int R_32F = 0, R_64F = 1, R_16F = 2, R_16BF = 14, R_8F_E4M3 = 28;
// cublasComputeType_t
constexpr int COMPUTE_32F = 68, COMPUTE_64F = 70;
// cublasOperation_t
constexpr int OP_N = 0, OP_T = 1;

size_t type_size(int t) {
    switch (t) {
        case R_32F: return 4;
        case R_64F: return 8;
        case R_16F:
        case R_16BF: return 2;
        case R_8F_E4M3: return 1;
        default: return 0;
    }
}

double f16_value(uint16_t h) {
    const int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
    double v;
    if (exp == 0) v = std::ldexp((double)man, -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = std::ldexp((double)(man | 1024), exp - 25);
    return sign ? -v : v;
}

double e4m3_value(uint8_t b) {
    const int sign = b >> 7, exp = (b >> 3) & 15, man = b & 7;
    double v;
    if (exp == 15 && man == 7) v = NAN;
    else if (exp == 0) v = std::ldexp((double)man, -9);
    else v = std::ldexp((double)(man | 8), exp - 10);
    return sign ? -v : v;
}

double load(int type, const void* base, size_t i) {
    switch (type) {
        case R_32F: return ((const float*)base)[i];
        case R_64F: return ((const double*)base)[i];
        case R_16F: return f16_value(((const uint16_t*)base)[i]);
        case R_16BF: {
            const uint32_t u = (uint32_t)((const uint16_t*)base)[i] << 16;
            float f;
            std::memcpy(&f, &u, 4);
            return f;
        }
        case R_8F_E4M3: return e4m3_value(((const uint8_t*)base)[i]);
        default: return NAN;
    }
}

void store(int type, void* base, size_t i, double v) {
    if (type == R_32F) ((float*)base)[i] = (float)v;
    else ((double*)base)[i] = v;
}

// One column-major GEMM: D = alpha * op(A) op(B) + beta * C, op(A) m x k, op(B) k x n, with
// an optional epilogue on alpha * op(A) op(B) + beta * C (bias per row of D, then GELU).
struct Problem {
    int m, n, k;
    int op_a, op_b;
    int a_type, b_type, c_type, d_type;
    const void *a, *b, *c;
    void* d;
    long long lda, ldb, ldc, ldd;
    long long stride_a, stride_b, stride_c, stride_d;
    int batch;
    double alpha, beta;
    const void* bias = nullptr;
    int bias_type = R_32F;
    bool gelu = false;
};

// Elements spanned by a column-major matrix of `rows` x `cols` with leading dimension `ld`.
size_t extent(long long rows, long long cols, long long ld) {
    return cols == 0 ? 0 : (size_t)(ld * (cols - 1) + rows);
}

bool check_operand(const char* what, const void* p, int type, long long rows, long long cols,
                   long long ld, long long stride, int batch) {
    if (ld < rows) {
        std::fprintf(stderr, "cuda model: %s has leading dimension %lld below its %lld rows\n",
                     what, ld, rows);
        return false;
    }
    const size_t elems = extent(rows, cols, ld) + (size_t)stride * (size_t)(batch - 1);
    return model::check_range((uint64_t)(uintptr_t)p, elems * type_size(type), what);
}

Status run(const Problem& p) {
    if (p.m < 0 || p.n < 0 || p.k < 0 || p.batch < 1) return INVALID_VALUE;
    if (p.m == 0 || p.n == 0) return OK;
    const long long a_rows = p.op_a == OP_N ? p.m : p.k, a_cols = p.op_a == OP_N ? p.k : p.m;
    const long long b_rows = p.op_b == OP_N ? p.k : p.n, b_cols = p.op_b == OP_N ? p.n : p.k;
    const bool reads_c = p.beta != 0.0;
    if ((p.k > 0 && (!check_operand("GEMM operand A", p.a, p.a_type, a_rows, a_cols, p.lda, p.stride_a, p.batch) ||
                     !check_operand("GEMM operand B", p.b, p.b_type, b_rows, b_cols, p.ldb, p.stride_b, p.batch))) ||
        (reads_c && !check_operand("GEMM operand C", p.c, p.c_type, p.m, p.n, p.ldc, p.stride_c, p.batch)) ||
        !check_operand("GEMM output D", p.d, p.d_type, p.m, p.n, p.ldd, p.stride_d, p.batch) ||
        (p.bias && !model::check_range((uint64_t)(uintptr_t)p.bias, (size_t)p.m * type_size(p.bias_type), "GEMM bias")))
        return EXECUTION_FAILED;
    std::vector<double> at((size_t)p.m * p.k), bt((size_t)p.n * p.k);
    for (int batch = 0; batch < p.batch; ++batch) {
        // op(A) as rows of k and op(B)^T as rows of k, so each output is one dot product.
        for (int i = 0; i < p.m; ++i)
            for (int l = 0; l < p.k; ++l) {
                const size_t idx = p.op_a == OP_N ? (size_t)i + (size_t)l * p.lda : (size_t)l + (size_t)i * p.lda;
                at[(size_t)i * p.k + l] = load(p.a_type, p.a, (size_t)batch * p.stride_a + idx);
            }
        for (int j = 0; j < p.n; ++j)
            for (int l = 0; l < p.k; ++l) {
                const size_t idx = p.op_b == OP_N ? (size_t)l + (size_t)j * p.ldb : (size_t)j + (size_t)l * p.ldb;
                bt[(size_t)j * p.k + l] = load(p.b_type, p.b, (size_t)batch * p.stride_b + idx);
            }
        for (int j = 0; j < p.n; ++j)
            for (int i = 0; i < p.m; ++i) {
                double acc = 0.0;
                const double* ar = &at[(size_t)i * p.k];
                const double* br = &bt[(size_t)j * p.k];
                for (int l = 0; l < p.k; ++l) acc += ar[l] * br[l];
                double v = p.alpha * acc;
                if (reads_c)
                    v += p.beta * load(p.c_type, p.c, (size_t)batch * p.stride_c + (size_t)i + (size_t)j * p.ldc);
                if (p.bias) v += load(p.bias_type, p.bias, (size_t)i);
                if (p.gelu) {
                    // cuBLASLt's GELU: the tanh approximation.
                    const double s = std::sqrt(2.0 / M_PI);
                    v = 0.5 * v * (1.0 + std::tanh(s * (v + 0.044715 * v * v * v)));
                }
                store(p.d_type, p.d, (size_t)batch * p.stride_d + (size_t)i + (size_t)j * p.ldd, v);
            }
    }
    return OK;
}

int handle_token = 0;

// ---- cuBLASLt descriptors ----

struct MatmulDesc {
    int compute, scale_type;
    int op_a = OP_N, op_b = OP_N;
    int epilogue = 1;  // CUBLASLT_EPILOGUE_DEFAULT
    const void* bias = nullptr;
    int bias_type = -1;
    const float* a_scale = nullptr;
    const float* b_scale = nullptr;
};

struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int order = 0;  // CUBLASLT_ORDER_COL
    int batch = 1;
    int64_t stride = 0;
};

struct Preference {
    size_t max_workspace = 0;
};

template <typename T>
Status read_attr(T& out, const void* buf, size_t size) {
    if (!buf || size != sizeof(T)) return INVALID_VALUE;
    std::memcpy(&out, buf, sizeof(T));
    return OK;
}

bool multiple_of_16(long long v) { return v % 16 == 0; }

}  // namespace

using model::Guard;

extern "C" {

// ---- cuBLAS ----

Status cublasCreate_v2(void** handle) {
    if (!handle) return INVALID_VALUE;
    *handle = &handle_token;
    return OK;
}

Status cublasDestroy_v2(void* handle) { return handle == &handle_token ? OK : NOT_INITIALIZED; }
Status cublasSetStream_v2(void* handle, void*) { return handle == &handle_token ? OK : NOT_INITIALIZED; }
Status cublasSetWorkspace_v2(void* handle, void*, size_t) { return handle == &handle_token ? OK : NOT_INITIALIZED; }
Status cublasSetMathMode(void* handle, int) { return handle == &handle_token ? OK : NOT_INITIALIZED; }

Status cublasGemmStridedBatchedEx(void* handle, int transa, int transb, int m, int n, int k,
                                  const void* alpha, const void* a, int a_type, int lda,
                                  long long stride_a, const void* b, int b_type, int ldb,
                                  long long stride_b, const void* beta, void* c, int c_type,
                                  int ldc, long long stride_c, int batch, int compute, int) {
    Guard g;
    if (handle != &handle_token) return NOT_INITIALIZED;
    if (!model::has_context("cublasGemmStridedBatchedEx")) return EXECUTION_FAILED;
    if ((transa != OP_N && transa != OP_T) || (transb != OP_N && transb != OP_T) || !alpha || !beta)
        return INVALID_VALUE;
    // The combinations the backend uses (cuBLAS supports these and more).
    const bool f64 = a_type == R_64F && b_type == R_64F && c_type == R_64F && compute == COMPUTE_64F;
    const bool f32 = (a_type == R_32F || a_type == R_16BF || a_type == R_16F) && b_type == a_type &&
                     c_type == R_32F && compute == COMPUTE_32F;
    if (!f64 && !f32) return NOT_SUPPORTED;
    Problem p{};
    p.m = m, p.n = n, p.k = k, p.op_a = transa, p.op_b = transb;
    p.a_type = a_type, p.b_type = b_type, p.c_type = c_type, p.d_type = c_type;
    p.a = a, p.b = b, p.c = c, p.d = c;
    p.lda = lda, p.ldb = ldb, p.ldc = ldc, p.ldd = ldc;
    p.stride_a = stride_a, p.stride_b = stride_b, p.stride_c = stride_c, p.stride_d = stride_c;
    p.batch = batch;
    p.alpha = f64 ? *(const double*)alpha : *(const float*)alpha;
    p.beta = f64 ? *(const double*)beta : *(const float*)beta;
    return run(p);
}

// ---- cuBLASLt ----

Status cublasLtCreate(void** handle) { return cublasCreate_v2(handle); }
Status cublasLtDestroy(void* handle) { return cublasDestroy_v2(handle); }

Status cublasLtMatmulDescCreate(void** desc, int compute, int scale_type) {
    if (!desc) return INVALID_VALUE;
    *desc = new MatmulDesc{compute, scale_type};
    return OK;
}

Status cublasLtMatmulDescDestroy(void* desc) {
    delete static_cast<MatmulDesc*>(desc);
    return OK;
}

Status cublasLtMatmulDescSetAttribute(void* desc, int attr, const void* buf, size_t size) {
    auto* d = static_cast<MatmulDesc*>(desc);
    if (!d) return INVALID_VALUE;
    switch (attr) {
        case 0: return read_attr(d->compute, buf, size);
        case 1: return read_attr(d->scale_type, buf, size);
        case 3: return read_attr(d->op_a, buf, size);
        case 4: return read_attr(d->op_b, buf, size);
        case 7: return read_attr(d->epilogue, buf, size);
        case 8: return read_attr(d->bias, buf, size);
        case 17: return read_attr(d->a_scale, buf, size);
        case 18: return read_attr(d->b_scale, buf, size);
        case 26: return read_attr(d->bias_type, buf, size);
        default: return NOT_SUPPORTED;
    }
}

Status cublasLtMatrixLayoutCreate(void** layout, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (!layout) return INVALID_VALUE;
    if (type_size(type) == 0) return NOT_SUPPORTED;
    *layout = new Layout{type, rows, cols, ld};
    return OK;
}

Status cublasLtMatrixLayoutDestroy(void* layout) {
    delete static_cast<Layout*>(layout);
    return OK;
}

Status cublasLtMatrixLayoutSetAttribute(void* layout, int attr, const void* buf, size_t size) {
    auto* l = static_cast<Layout*>(layout);
    if (!l) return INVALID_VALUE;
    switch (attr) {
        case 0: return read_attr(l->type, buf, size);
        case 1: return read_attr(l->order, buf, size);
        case 2: return read_attr(l->rows, buf, size);
        case 3: return read_attr(l->cols, buf, size);
        case 4: return read_attr(l->ld, buf, size);
        case 5: return read_attr(l->batch, buf, size);
        case 6: return read_attr(l->stride, buf, size);
        default: return NOT_SUPPORTED;
    }
}

Status cublasLtMatmulPreferenceCreate(void** pref) {
    if (!pref) return INVALID_VALUE;
    *pref = new Preference{};
    return OK;
}

Status cublasLtMatmulPreferenceDestroy(void* pref) {
    delete static_cast<Preference*>(pref);
    return OK;
}

Status cublasLtMatmulPreferenceSetAttribute(void* pref, int attr, const void* buf, size_t size) {
    auto* p = static_cast<Preference*>(pref);
    if (!p) return INVALID_VALUE;
    if (attr == 1) {  // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES (uint64_t)
        uint64_t v = 0;
        Status s = read_attr(v, buf, size);
        p->max_workspace = v;
        return s;
    }
    return NOT_SUPPORTED;
}

namespace {

// The problem a cuBLASLt matmul describes, or why it is refused.
Status lt_problem(const MatmulDesc& d, const Layout& a, const Layout& b, const Layout& c,
                  const Layout& dl, Problem& p) {
    if (a.order != 0 || b.order != 0 || c.order != 0 || dl.order != 0) return NOT_SUPPORTED;
    if (d.scale_type != R_32F && d.scale_type != R_64F) return NOT_SUPPORTED;
    const long long m = d.op_a == OP_N ? a.rows : a.cols;
    const long long k = d.op_a == OP_N ? a.cols : a.rows;
    const long long kb = d.op_b == OP_N ? b.rows : b.cols;
    const long long n = d.op_b == OP_N ? b.cols : b.rows;
    if (k != kb || (long long)c.rows != m || (long long)c.cols != n || dl.rows != c.rows ||
        dl.cols != c.cols || a.batch != b.batch || a.batch != c.batch || c.batch != dl.batch)
        return INVALID_VALUE;
    const bool fp8 = a.type == R_8F_E4M3 || b.type == R_8F_E4M3;
    if (fp8) {
        // cuBLASLt's fp8 GEMMs: e4m3 x e4m3 in the TN layout, dimensions and leading
        // dimensions multiples of 16, f32 compute.
        if (a.type != R_8F_E4M3 || b.type != R_8F_E4M3 || d.op_a != OP_T || d.op_b != OP_N ||
            d.compute != COMPUTE_32F || !multiple_of_16(m) || !multiple_of_16(n) ||
            !multiple_of_16(k) || !multiple_of_16(a.ld) || !multiple_of_16(b.ld))
            return NOT_SUPPORTED;
    } else if (a.type != b.type || d.compute != (a.type == R_64F ? COMPUTE_64F : COMPUTE_32F)) {
        return NOT_SUPPORTED;
    }
    if ((c.type != R_32F && c.type != R_64F) || dl.type != c.type) return NOT_SUPPORTED;
    const bool bias = d.epilogue == 4 || d.epilogue == 36;
    if (d.epilogue != 1 && !bias) return NOT_SUPPORTED;
    p = Problem{};
    p.m = (int)m, p.n = (int)n, p.k = (int)k, p.op_a = d.op_a, p.op_b = d.op_b;
    p.a_type = a.type, p.b_type = b.type, p.c_type = c.type, p.d_type = dl.type;
    p.lda = a.ld, p.ldb = b.ld, p.ldc = c.ld, p.ldd = dl.ld;
    p.stride_a = a.stride, p.stride_b = b.stride, p.stride_c = c.stride, p.stride_d = dl.stride;
    p.batch = a.batch;
    p.gelu = d.epilogue == 36;
    if (bias) {
        if (!d.bias) return INVALID_VALUE;
        p.bias = d.bias;
        p.bias_type = d.bias_type == -1 ? dl.type : d.bias_type;
        if (type_size(p.bias_type) == 0) return NOT_SUPPORTED;
    }
    return OK;
}

}  // namespace

Status cublasLtMatmulAlgoGetHeuristic(void* handle, void* desc, void* a, void* b, void* c, void* d,
                                      void* pref, int requested, void* results, int* returned) {
    Guard g;
    if (handle != &handle_token) return NOT_INITIALIZED;
    if (!desc || !a || !b || !c || !d || !pref || requested < 1 || !results || !returned)
        return INVALID_VALUE;
    Problem p;
    const Status s = lt_problem(*static_cast<MatmulDesc*>(desc), *static_cast<Layout*>(a),
                                *static_cast<Layout*>(b), *static_cast<Layout*>(c),
                                *static_cast<Layout*>(d), p);
    *returned = 0;
    if (s != OK) return s;
    // cublasLtMatmulHeuristicResult_t: algo (8 x u64), workspaceSize, state, wavesCount,
    // reserved[4].
    struct Result {
        uint64_t algo[8];
        size_t workspace;
        int state;
        float waves;
        int reserved[4];
    };
    auto* r = static_cast<Result*>(results);
    std::memset(r, 0, sizeof(Result));
    r->algo[0] = 0x666c7578;  // "flux": the one algorithm of the model
    r->waves = 1.0f;
    *returned = 1;
    return OK;
}

Status cublasLtMatmul(void* handle, void* desc, const void* alpha, const void* a, void* a_layout,
                      const void* b, void* b_layout, const void* beta, const void* c,
                      void* c_layout, void* d, void* d_layout, const void* algo, void*,
                      size_t, void*) {
    Guard g;
    if (handle != &handle_token) return NOT_INITIALIZED;
    if (!model::has_context("cublasLtMatmul")) return EXECUTION_FAILED;
    if (!desc || !alpha || !beta || !a_layout || !b_layout || !c_layout || !d_layout)
        return INVALID_VALUE;
    if (algo && *static_cast<const uint64_t*>(algo) != 0x666c7578) return INVALID_VALUE;
    const auto& md = *static_cast<MatmulDesc*>(desc);
    Problem p;
    if (Status s = lt_problem(md, *static_cast<Layout*>(a_layout), *static_cast<Layout*>(b_layout),
                              *static_cast<Layout*>(c_layout), *static_cast<Layout*>(d_layout), p))
        return s;
    p.a = a, p.b = b, p.c = c, p.d = d;
    const bool f64 = md.scale_type == R_64F;
    p.alpha = f64 ? *(const double*)alpha : *(const float*)alpha;
    p.beta = f64 ? *(const double*)beta : *(const float*)beta;
    // The fp8 scales are device pointers to one f32 each (1 when not set).
    for (const float* scale : {md.a_scale, md.b_scale}) {
        if (!scale) continue;
        if (!model::check_range((uint64_t)(uintptr_t)scale, 4, "GEMM scale")) return EXECUTION_FAILED;
        p.alpha *= *scale;
    }
    return run(p);
}

}  // extern "C"
