// Checks the CPU model of the CUDA libraries (driver.cpp, blas.cpp) itself: that it enforces
// the rules it claims (allocation bounds, guard zones, launch limits, PTX entries matching the
// sources, cuBLASLt's fp8 layout) and that its GEMMs compute the documented column-major
// products, on values worked out by hand. Linked against the model's libcuda.so by
// tests/emulated.rs; prints one line per failed check and exits 1 if any failed.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <thread>

extern "C" {
int cuInit(unsigned);
int cuDevicePrimaryCtxRetain(void**, int);
int cuCtxSetCurrent(void*);
int cuMemAlloc_v2(uint64_t*, size_t);
int cuMemFree_v2(uint64_t);
int cuMemcpyHtoD_v2(uint64_t, const void*, size_t);
int cuMemcpyDtoH_v2(void*, uint64_t, size_t);
int cuModuleLoadData(void**, const void*);
int cuModuleGetFunction(void**, void*, const char*);
int cuFuncSetAttribute(void*, int, int);
int cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                   void*, void**, void**);
int cublasCreate_v2(void**);
int cublasGemmStridedBatchedEx(void*, int, int, int, int, int, const void*, const void*, int, int,
                               long long, const void*, int, int, long long, const void*, void*,
                               int, int, long long, int, int, int);
int cublasLtMatmulDescCreate(void**, int, int);
int cublasLtMatmulDescSetAttribute(void*, int, const void*, size_t);
int cublasLtMatrixLayoutCreate(void**, int, uint64_t, uint64_t, int64_t);
int cublasLtMatmulPreferenceCreate(void**);
int cublasLtMatmulAlgoGetHeuristic(void*, void*, void*, void*, void*, void*, void*, int, void*,
                                   int*);
int cublasLtMatmul(void*, void*, const void*, const void*, void*, const void*, void*, const void*,
                   const void*, void*, void*, void*, const void*, void*, size_t, void*);
}

namespace {

int checks = 0, failed = 0;

void expect(bool ok, const char* what) {
    ++checks;
    if (!ok) {
        ++failed;
        std::printf("FAIL %s\n", what);
    }
}

void expect_code(int got, int want, const char* what) {
    ++checks;
    if (got != want) {
        ++failed;
        std::printf("FAIL %s: status %d, expected %d\n", what, got, want);
    }
}

const char* AFFINE_PTX =
    ".visible .entry affine_f32(\n.param .u64 p0,\n.param .u64 p1,\n.param .f64 p2,\n"
    ".param .f64 p3,\n.param .u64 p4\n)\n{\n}\n";

uint64_t upload(const void* data, size_t bytes) {
    uint64_t d = 0;
    cuMemAlloc_v2(&d, bytes);
    cuMemcpyHtoD_v2(d, data, bytes);
    return d;
}

uint16_t bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);  // the values below are exact in bf16
}

// cuBLAS / cuBLASLt enum values (cudaDataType, cublasComputeType_t, cublasOperation_t,
// matmul descriptor attributes, epilogues).
constexpr int R_32F = 0, R_16BF = 14, R_8F_E4M3 = 28, COMPUTE_32F = 68, OP_N = 0, OP_T = 1;
constexpr int TRANSA = 3, TRANSB = 4, EPILOGUE = 7, BIAS_POINTER = 8, B_SCALE_POINTER = 18;
constexpr int EPILOGUE_BIAS = 4, EPILOGUE_GELU_BIAS = 36;

void blas_checks() {
    void* h = nullptr;
    expect_code(cublasCreate_v2(&h), 0, "cublasCreate");
    // Column-major A (2x3) = [1 2 3; 4 5 6] stored with lda 2; B (3x2) = [1 0; 0 1; 1 1].
    // C = A B = [4 5; 10 11].
    const float a[] = {1, 4, 2, 5, 3, 6};
    const float b[] = {1, 0, 1, 0, 1, 1};
    float c[4] = {};
    uint64_t da = upload(a, sizeof a), db = upload(b, sizeof b), dc = upload(c, sizeof c);
    const float one = 1, zero = 0;
    expect_code(cublasGemmStridedBatchedEx(h, OP_N, OP_N, 2, 2, 3, &one, (void*)da, R_32F, 2, 0,
                                           (void*)db, R_32F, 3, 0, &zero, (void*)dc, R_32F, 2, 0,
                                           1, COMPUTE_32F, 0),
                0, "f32 GEMM");
    cuMemcpyDtoH_v2(c, dc, sizeof c);
    expect(c[0] == 4 && c[1] == 10 && c[2] == 5 && c[3] == 11, "f32 GEMM: C = A B column-major");
    // The same with A given transposed (A^T stored 3x2, lda 3) and beta = 1 adding C.
    const float at[] = {1, 2, 3, 4, 5, 6};
    uint64_t dat = upload(at, sizeof at);
    expect_code(cublasGemmStridedBatchedEx(h, OP_T, OP_N, 2, 2, 3, &one, (void*)dat, R_32F, 3, 0,
                                           (void*)db, R_32F, 3, 0, &one, (void*)dc, R_32F, 2, 0,
                                           1, COMPUTE_32F, 0),
                0, "f32 GEMM, A transposed, beta 1");
    cuMemcpyDtoH_v2(c, dc, sizeof c);
    expect(c[0] == 8 && c[1] == 20 && c[2] == 10 && c[3] == 22, "op(A) = A^T and beta * C");
    // A leading dimension that runs past the buffer is refused, nothing written.
    expect(cublasGemmStridedBatchedEx(h, OP_N, OP_N, 2, 2, 3, &one, (void*)da, R_32F, 4, 0,
                                      (void*)db, R_32F, 3, 0, &zero, (void*)dc, R_32F, 2, 0, 1,
                                      COMPUTE_32F, 0) != 0,
           "GEMM reading past operand A fails");

    // cuBLASLt, the backend's layout: D (n x m) = op(A) B with A = W stored k x n column-major
    // (TRANSA = T) and B = X (k x m). k = 2, n = 2, m = 1: W's columns (1, -1) and (2, 3),
    // x = (1, 2): D = (-1, 8), + bias (0.5, -9) = (-0.5, -1); then GELU(tanh) of those.
    const uint16_t w[] = {bf16(1), bf16(-1), bf16(2), bf16(3)};
    const uint16_t x[] = {bf16(1), bf16(2)};
    const float bias[] = {0.5f, -9.0f};
    float d[2] = {};
    uint64_t dw = upload(w, sizeof w), dx = upload(x, sizeof x), dbias = upload(bias, sizeof bias),
             dd = upload(d, sizeof d);
    void *desc, *la, *lb, *lc, *pref;
    cublasLtMatmulDescCreate(&desc, COMPUTE_32F, R_32F);
    const int op_t = OP_T;
    cublasLtMatmulDescSetAttribute(desc, TRANSA, &op_t, sizeof op_t);
    for (int epi : {EPILOGUE_BIAS, EPILOGUE_GELU_BIAS}) {
        cublasLtMatmulDescSetAttribute(desc, EPILOGUE, &epi, sizeof epi);
        const void* bp = (const void*)dbias;
        cublasLtMatmulDescSetAttribute(desc, BIAS_POINTER, &bp, sizeof bp);
        cublasLtMatrixLayoutCreate(&la, R_16BF, 2, 2, 2);
        cublasLtMatrixLayoutCreate(&lb, R_16BF, 2, 1, 2);
        cublasLtMatrixLayoutCreate(&lc, R_32F, 2, 1, 2);
        cublasLtMatmulPreferenceCreate(&pref);
        unsigned char heur[128] = {};
        int returned = 0;
        expect_code(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, lc, lc, pref, 1, heur, &returned),
                    0, "cuBLASLt heuristic");
        expect(returned == 1, "cuBLASLt returns one algorithm");
        expect_code(cublasLtMatmul(h, desc, &one, (void*)dw, la, (void*)dx, lb, &zero, (void*)dd, lc,
                                   (void*)dd, lc, heur, nullptr, 0, nullptr),
                    0, "cuBLASLt bf16 GEMM with bias");
        cuMemcpyDtoH_v2(d, dd, sizeof d);
        double d0 = 1 * 1 + (-1) * 2 + 0.5, d1 = 2 * 1 + 3 * 2 - 9.0;
        if (epi == EPILOGUE_GELU_BIAS) {
            auto gelu = [](double v) {
                return 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
            };
            d0 = gelu(d0), d1 = gelu(d1);
        }
        expect(std::fabs(d[0] - d0) < 1e-6 && std::fabs(d[1] - d1) < 1e-6,
               epi == EPILOGUE_BIAS ? "bias epilogue" : "GELU(tanh) + bias epilogue");
    }
    // fp8 must be e4m3 x e4m3 in the TN layout with sizes that are multiples of 16.
    void *f8a, *f8b, *f8c, *desc8;
    cublasLtMatmulDescCreate(&desc8, COMPUTE_32F, R_32F);
    cublasLtMatrixLayoutCreate(&f8a, R_8F_E4M3, 16, 16, 16);
    cublasLtMatrixLayoutCreate(&f8b, R_8F_E4M3, 16, 16, 16);
    cublasLtMatrixLayoutCreate(&f8c, R_32F, 16, 16, 16);
    unsigned char heur[128] = {};
    int returned = 0;
    expect_code(cublasLtMatmulAlgoGetHeuristic(h, desc8, f8a, f8b, f8c, f8c, pref, 1, heur, &returned),
                15, "fp8 GEMM in the NN layout is refused");
    cublasLtMatmulDescSetAttribute(desc8, TRANSA, &op_t, sizeof op_t);
    expect_code(cublasLtMatmulAlgoGetHeuristic(h, desc8, f8a, f8b, f8c, f8c, pref, 1, heur, &returned),
                0, "fp8 GEMM in the TN layout is served");
    // Its scale pointer multiplies the product: A = B = 1 everywhere (code 0x38), scale 0.25:
    // each output is 16 * 0.25 = 4.
    unsigned char ones[256];
    std::memset(ones, 0x38, sizeof ones);
    const float quarter = 0.25f;
    float out[256];
    uint64_t d8a = upload(ones, 256), d8b = upload(ones, 256), dscale = upload(&quarter, 4),
             dout = upload(out, sizeof out);
    const void* sp = (const void*)dscale;
    cublasLtMatmulDescSetAttribute(desc8, B_SCALE_POINTER, &sp, sizeof sp);
    expect_code(cublasLtMatmul(h, desc8, &one, (void*)d8a, f8a, (void*)d8b, f8b, &zero, (void*)dout,
                               f8c, (void*)dout, f8c, heur, nullptr, 0, nullptr),
                0, "fp8 GEMM");
    cuMemcpyDtoH_v2(out, dout, sizeof out);
    bool all4 = true;
    for (float v : out) all4 = all4 && v == 4.0f;
    expect(all4, "fp8 GEMM applies the B scale pointer");
    const int op_n = OP_N;
    cublasLtMatmulDescSetAttribute(desc8, TRANSB, &op_n, sizeof op_n);
    cuMemFree_v2(da);
}

void driver_checks() {
    void *m = nullptr, *f = nullptr;
    expect_code(cuModuleLoadData(&m, ".visible .entry no_such_kernel(\n.param .u64 p0\n)\n{\n}\n"),
                200, "a PTX entry the model does not know");
    expect_code(cuModuleLoadData(&m, ".visible .entry affine_f32(\n.param .u64 p0\n)\n{\n}\n"), 200,
                "a PTX entry whose parameter count differs from the source");
    expect_code(cuModuleLoadData(&m, AFFINE_PTX), 0, "loading the PTX");
    expect_code(cuModuleGetFunction(&f, m, "affine_f32"), 0, "finding the entry");
    expect_code(cuModuleGetFunction(&f, m, "affine_f64"), 500, "an entry the module lacks");
    expect_code(cuModuleGetFunction(&f, m, "affine_f32"), 0, "finding the entry again");

    const float xs[10] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    uint64_t x = upload(xs, sizeof xs), out = 0;
    cuMemAlloc_v2(&out, sizeof xs);
    float fresh = 0;
    cuMemcpyDtoH_v2(&fresh, out, 4);
    expect(std::isnan(fresh), "new allocations read as NaN");
    double mul = 2, add = 1;
    uint64_t n = 10;
    void* params[] = {&out, &x, &mul, &add, &n};
    expect_code(cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 0, nullptr, params, nullptr), 0, "a launch");
    float ys[10];
    cuMemcpyDtoH_v2(ys, out, sizeof ys);
    expect(ys[0] == 1 && ys[9] == 19, "the launch computed 2 x + 1");
    expect_code(cuLaunchKernel(f, 1, 1, 1, 32, 33, 1, 0, nullptr, params, nullptr), 1,
                "a block of 32 x 33 threads");
    expect_code(cuLaunchKernel(f, 1, 65536, 1, 64, 1, 1, 0, nullptr, params, nullptr), 1,
                "a grid with 65536 blocks in y");
    expect_code(cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 48 * 1024 + 4, nullptr, params, nullptr), 1,
                "more than 48 KiB of dynamic shared memory without the attribute");
    expect_code(cuFuncSetAttribute(f, 8, 64 * 1024), 0, "raising the shared memory limit");
    expect_code(cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 48 * 1024 + 4, nullptr, params, nullptr), 0,
                "more than 48 KiB after raising the limit");
    expect_code(cuMemcpyHtoD_v2(out + 4, xs, sizeof xs), 1, "a copy running past its allocation");
    expect_code(cuMemcpyHtoD_v2(out, xs, sizeof xs), 0, "a copy inside it");
    // Last: a kernel writing one element past its 40-byte output. The error is sticky.
    n = 11;
    expect_code(cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 0, nullptr, params, nullptr), 700,
                "a kernel writing past the end of its buffer");
    expect_code(cuMemcpyDtoH_v2(ys, out, 4), 700, "the illegal address is sticky");
}

}  // namespace

int main() {
    expect_code(cuInit(0), 0, "cuInit");
    uint64_t p = 0;
    expect_code(cuMemAlloc_v2(&p, 4), 201, "an allocation before any context is current");
    void* ctx = nullptr;
    expect_code(cuDevicePrimaryCtxRetain(&ctx, 0), 0, "retaining the primary context");
    expect_code(cuCtxSetCurrent(ctx), 0, "making it current");
    expect_code(cuMemAlloc_v2(&p, 4), 0, "an allocation with the context current");
    // The context is current per thread, as in the driver.
    int other = -1;
    std::thread([&] { other = cuMemAlloc_v2(&p, 4); }).join();
    expect_code(other, 201, "an allocation on another thread, where it is not current");
    blas_checks();
    driver_checks();
    std::printf("driver model: %d checks, %d failed\n", checks, failed);
    return failed == 0 ? 0 : 1;
}
