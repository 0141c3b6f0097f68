// A CPU stand-in for the CUDA driver library (libcuda.so), built on the execution model of
// emu.h, so that the whole CUDA backend (context, module loading from NVRTC's PTX, allocations,
// copies, kernel launches through cudarc, cuBLAS in blas.cpp) runs on a machine without a GPU.
//
// It implements the part of the driver API the backend and cudarc use, with the rules a GPU
// would enforce where breaking them is a bug of ours rather than a limit of the model:
// - a launch's block has at most 1024 threads, its grid's y and z at most 65535 blocks, and its
//   dynamic shared memory at most 48 KiB unless the kernel was allowed more with
//   cuFuncSetAttribute (at most 227 KiB, an H100's limit);
// - a call that works on the current context fails with CUDA_ERROR_INVALID_CONTEXT on a thread
//   that has not made the context current (cuCtxSetCurrent is per thread, as in the driver);
// - a copy or memset must lie inside one allocation;
// - new allocations are filled with 0xff bytes (NaN as floats), so reading memory nothing wrote
//   shows up in results, and every allocation is followed by a guard zone that is checked after
//   each launch and copy, so a kernel writing past the end of its buffer fails the launch with
//   CUDA_ERROR_ILLEGAL_ADDRESS (sticky, as on the GPU: every later call fails too).
// Everything runs synchronously on the calling thread (streams and events are accepted and
// ordered trivially), so stream-ordering bugs are not detected; nor is speed. With
// FLUX_CUDA_MODEL_TRACE_DIR set, every copy between host and device and every launch is logged
// to DIR/trace-PID.txt (tests/model_trace.rs reads it).
//
// The kernel table comes from the generated `kernels.inc` (the sources of shaders/cuda) and
// `kernel_table.inc` (one FLUX_KERNEL(name) per `__global__` function); cuModuleLoadData takes
// the PTX that NVRTC produced and serves the entries it lists, checking that each entry's
// parameter count matches the C++ function's.

#define FLUX_CUDA_EMULATOR 1
#include "emu.h"
#include "kernels.inc"
#include "model.h"

#include <map>
#include <unistd.h>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using CUresult = int;
constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_INITIALIZED = 3;
constexpr CUresult CUDA_ERROR_INVALID_DEVICE = 101;
constexpr CUresult CUDA_ERROR_INVALID_IMAGE = 200;
constexpr CUresult CUDA_ERROR_INVALID_CONTEXT = 201;
constexpr CUresult CUDA_ERROR_INVALID_HANDLE = 400;
constexpr CUresult CUDA_ERROR_NOT_FOUND = 500;
constexpr CUresult CUDA_ERROR_ILLEGAL_ADDRESS = 700;
constexpr CUresult CUDA_ERROR_NOT_SUPPORTED = 801;

// ---- kernels ----

using Trampoline = void (*)(void** params);

template <typename... A, size_t... I>
void call_with(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(p[I])...);
}

template <auto F>
void trampoline(void** p) {
    [&]<typename... A>(void (*f)(A...)) {
        call_with(f, p, std::index_sequence_for<A...>{});
    }(F);
}

template <typename... A>
constexpr size_t arity(void (*)(A...)) {
    return sizeof...(A);
}

struct KernelInfo {
    const char* name;
    Trampoline run;
    size_t params;
};

#define FLUX_KERNEL(name) {#name, &trampoline<&name>, arity(&name)},
const KernelInfo KERNELS[] = {
#include "kernel_table.inc"
};
#undef FLUX_KERNEL

struct Function {
    const KernelInfo* kernel;
    int max_dynamic_smem = 48 * 1024;
};

struct Module {
    std::vector<std::unique_ptr<Function>> functions;
    std::map<std::string, Function*> by_name;
};

// ---- state ----

constexpr size_t GUARD = 256;
constexpr unsigned char GUARD_BYTE = 0xa5;
constexpr size_t TOTAL_MEMORY = size_t(16) << 30;
constexpr int MAX_DYNAMIC_SMEM_OPTIN = 227 * 1024;

std::recursive_mutex big_lock;
std::map<uint64_t, size_t> allocations;  // base -> size in bytes
size_t allocated = 0;
CUresult sticky = CUDA_SUCCESS;
bool initialised = false;
int context_token = 0;
thread_local void* current_context = nullptr;
// FLUX_CUDA_MODEL_TRACE_DIR set: every copy, launch and synchronisation is logged, one line each, to
// DIR/trace-PID.txt (for tests of what a run transfers).
FILE* trace = nullptr;

void trace_line(const char* kind, size_t bytes, const char* name = "") {
    if (!trace) return;
    std::fprintf(trace, "%s %zu %s\n", kind, bytes, name);
    std::fflush(trace);
}

bool guards_intact(const char* after) {
    for (const auto& [base, size] : allocations) {
        const auto* g = reinterpret_cast<const unsigned char*>(base + size);
        for (size_t i = 0; i < GUARD; ++i) {
            if (g[i] != GUARD_BYTE) {
                std::fprintf(stderr,
                             "cuda model: %s wrote past the end of a %zu-byte allocation "
                             "(byte %zu after it)\n",
                             after, size, i);
                sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
                return false;
            }
        }
    }
    return true;
}

CUresult status() { return initialised ? sticky : CUDA_ERROR_NOT_INITIALIZED; }

// The state of the calling thread for a call that works on the current context: as the driver,
// a thread that never made the context current gets CUDA_ERROR_INVALID_CONTEXT.
CUresult status_in_context(const char* call) {
    if (CUresult s = status()) return s;
    if (current_context == nullptr) {
        std::fprintf(stderr, "cuda model: %s on a thread with no current context\n", call);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    return CUDA_SUCCESS;
}

}  // namespace

namespace model {

bool check_range(uint64_t addr, size_t bytes, const char* what) {
    auto it = allocations.upper_bound(addr);
    if (it != allocations.begin()) {
        --it;
        if (addr >= it->first && addr - it->first + bytes <= it->second) return true;
        std::fprintf(stderr,
                     "cuda model: %s of %zu bytes at offset %llu of a %zu-byte allocation "
                     "runs past its end\n",
                     what, bytes, (unsigned long long)(addr - it->first), it->second);
        return false;
    }
    std::fprintf(stderr, "cuda model: %s of %zu bytes at 0x%llx is outside every allocation\n",
                 what, bytes, (unsigned long long)addr);
    return false;
}

bool has_context(const char* call) { return status_in_context(call) == CUDA_SUCCESS; }

void lock() { big_lock.lock(); }
void unlock() { big_lock.unlock(); }

}  // namespace model

using model::Guard;

extern "C" {

// ---- errors, initialisation, devices ----

CUresult cuGetErrorName(CUresult e, const char** out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    switch (e) {
        case CUDA_SUCCESS: *out = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *out = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *out = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *out = "CUDA_ERROR_NOT_INITIALIZED"; break;
        case CUDA_ERROR_INVALID_DEVICE: *out = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_IMAGE: *out = "CUDA_ERROR_INVALID_IMAGE"; break;
        case CUDA_ERROR_INVALID_CONTEXT: *out = "CUDA_ERROR_INVALID_CONTEXT"; break;
        case CUDA_ERROR_INVALID_HANDLE: *out = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *out = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_ILLEGAL_ADDRESS: *out = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *out = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *out = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult e, const char** out) { return cuGetErrorName(e, out); }

CUresult cuInit(unsigned flags) {
    Guard g;
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if (!initialised) {
        if (const char* dir = std::getenv("FLUX_CUDA_MODEL_TRACE_DIR")) {
            const std::string path = std::string(dir) + "/trace-" + std::to_string(getpid()) + ".txt";
            trace = std::fopen(path.c_str(), "a");
            if (!trace) std::fprintf(stderr, "cuda model: cannot open the trace %s\n", path.c_str());
        }
    }
    initialised = true;
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 12080;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int* n) {
    Guard g;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    *n = 1;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(int* dev, int ordinal) {
    Guard g;
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *dev = 0;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, int dev) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::snprintf(name, (size_t)len, "CPU model of CUDA (sm_90, flux-cuda tests/emu)");
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, int dev) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = TOTAL_MEMORY;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, int attribute, int dev) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attribute) {
        case 1: *value = 1024; break;           // max threads per block
        case 2: *value = 1024; break;           // max block dim x
        case 3: *value = 1024; break;           // max block dim y
        case 4: *value = 64; break;             // max block dim z
        case 5: *value = 0x7fffffff; break;     // max grid dim x
        case 6: *value = 65535; break;          // max grid dim y
        case 7: *value = 65535; break;          // max grid dim z
        case 8: *value = 48 * 1024; break;      // shared memory per block
        case 10: *value = 32; break;            // warp size
        case 16: *value = 132; break;           // multiprocessors (an H100 SXM)
        case 41: *value = 1; break;             // unified addressing
        case 75: *value = 9; break;             // compute capability major
        case 76: *value = 0; break;             // compute capability minor
        case 97: *value = MAX_DYNAMIC_SMEM_OPTIN; break;  // shared memory per block, opt-in
        case 115: *value = 1; break;            // memory pools: yes (stream-ordered alloc/free, as on an H100)
        default: *value = 0; break;
    }
    return CUDA_SUCCESS;
}

// ---- contexts ----

CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    Guard g;
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &context_token;
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(int dev) { return dev == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE; }

CUresult cuCtxSetCurrent(void* ctx) {
    if (ctx != nullptr && ctx != &context_token) return CUDA_ERROR_INVALID_HANDLE;
    current_context = ctx;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(void** ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = current_context;
    return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize() {
    Guard g;
    trace_line("sync", 0);
    return status_in_context("cuCtxSynchronize");
}

// ---- memory ----

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    Guard g;
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult s = status_in_context("cuMemGetInfo")) return s;
    *total = TOTAL_MEMORY;
    *free_bytes = TOTAL_MEMORY - allocated;
    return status();
}

CUresult cuMemAlloc_v2(uint64_t* dptr, size_t bytes) {
    Guard g;
    if (!dptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult s = status_in_context("cuMemAlloc")) return s;
    if (bytes > TOTAL_MEMORY - allocated) return CUDA_ERROR_OUT_OF_MEMORY;
    const size_t padded = (bytes + GUARD + 255) / 256 * 256;
    auto* p = static_cast<unsigned char*>(std::aligned_alloc(256, padded));
    if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
    std::memset(p, 0xff, bytes);
    std::memset(p + bytes, GUARD_BYTE, padded - bytes);
    allocations[(uint64_t)(uintptr_t)p] = bytes;
    allocated += bytes;
    *dptr = (uint64_t)(uintptr_t)p;
    return CUDA_SUCCESS;
}

CUresult cuMemFree_v2(uint64_t dptr) {
    Guard g;
    auto it = allocations.find(dptr);
    if (it == allocations.end()) {
        std::fprintf(stderr, "cuda model: cuMemFree of 0x%llx, which is not an allocation\n",
                     (unsigned long long)dptr);
        return CUDA_ERROR_INVALID_VALUE;
    }
    guards_intact("an earlier operation");
    allocated -= it->second;
    allocations.erase(it);
    std::free(reinterpret_cast<void*>(dptr));
    return status();
}

CUresult cuMemAllocAsync(uint64_t* dptr, size_t bytes, void*) { return cuMemAlloc_v2(dptr, bytes); }
CUresult cuMemFreeAsync(uint64_t dptr, void*) { return cuMemFree_v2(dptr); }

CUresult cuMemcpyHtoD_v2(uint64_t dst, const void* src, size_t bytes) {
    Guard g;
    if (CUresult s = status_in_context("cuMemcpyHtoD")) return s;
    if (bytes == 0) return CUDA_SUCCESS;
    if (!src || !model::check_range(dst, bytes, "host-to-device copy")) return CUDA_ERROR_INVALID_VALUE;
    trace_line("htod", bytes);
    std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void* dst, uint64_t src, size_t bytes) {
    Guard g;
    if (CUresult s = status_in_context("cuMemcpyDtoH")) return s;
    if (bytes == 0) return CUDA_SUCCESS;
    if (!dst || !model::check_range(src, bytes, "device-to-host copy")) return CUDA_ERROR_INVALID_VALUE;
    trace_line("dtoh", bytes);
    std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoD_v2(uint64_t dst, uint64_t src, size_t bytes) {
    Guard g;
    if (CUresult s = status_in_context("cuMemcpyDtoD")) return s;
    if (bytes == 0) return CUDA_SUCCESS;
    if (!model::check_range(src, bytes, "device-to-device copy (source)") ||
        !model::check_range(dst, bytes, "device-to-device copy (destination)"))
        return CUDA_ERROR_INVALID_VALUE;
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t bytes, void*) {
    return cuMemcpyHtoD_v2(dst, src, bytes);
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t bytes, void*) {
    return cuMemcpyDtoH_v2(dst, src, bytes);
}
CUresult cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, void*) {
    return cuMemcpyDtoD_v2(dst, src, bytes);
}

CUresult cuMemsetD8_v2(uint64_t dst, unsigned char value, size_t n) {
    Guard g;
    if (CUresult s = status_in_context("cuMemsetD8")) return s;
    if (n == 0) return CUDA_SUCCESS;
    if (!model::check_range(dst, n, "memset")) return CUDA_ERROR_INVALID_VALUE;
    std::memset(reinterpret_cast<void*>(dst), value, n);
    return CUDA_SUCCESS;
}

CUresult cuMemsetD8Async(uint64_t dst, unsigned char value, size_t n, void*) {
    return cuMemsetD8_v2(dst, value, n);
}

// ---- streams and events (everything is already complete when it is queued) ----

CUresult cuStreamCreate(void** stream, unsigned) {
    if (!stream) return CUDA_ERROR_INVALID_VALUE;
    *stream = new int(0);
    return CUDA_SUCCESS;
}

CUresult cuStreamDestroy_v2(void* stream) {
    delete static_cast<int*>(stream);
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(void*) {
    Guard g;
    trace_line("sync", 0);
    return status_in_context("cuStreamSynchronize");
}

CUresult cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }

CUresult cuEventCreate(void** event, unsigned) {
    if (!event) return CUDA_ERROR_INVALID_VALUE;
    *event = new int(0);
    return CUDA_SUCCESS;
}

CUresult cuEventDestroy_v2(void* event) {
    delete static_cast<int*>(event);
    return CUDA_SUCCESS;
}

CUresult cuEventRecord(void*, void*) { return CUDA_SUCCESS; }
CUresult cuEventSynchronize(void*) { return CUDA_SUCCESS; }
CUresult cuEventQuery(void*) { return CUDA_SUCCESS; }

CUresult cuEventElapsedTime(float* ms, void*, void*) {
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    *ms = 0.0f;
    return CUDA_SUCCESS;
}

// ---- modules and launches ----

CUresult cuModuleLoadData(void** module, const void* image) {
    Guard g;
    if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult s = status_in_context("cuModuleLoadData")) return s;
    const std::string_view ptx(static_cast<const char*>(image));
    auto m = std::make_unique<Module>();
    // Entries: `.entry NAME(` followed by `.param` lines up to the closing `)`.
    size_t at = 0;
    while ((at = ptx.find(".entry ", at)) != std::string_view::npos) {
        at += 7;
        const size_t open = ptx.find('(', at);
        const size_t close = ptx.find(')', at);
        if (open == std::string_view::npos || close == std::string_view::npos || close < open)
            return CUDA_ERROR_INVALID_IMAGE;
        std::string name(ptx.substr(at, open - at));
        while (!name.empty() && name.back() == ' ') name.pop_back();
        size_t params = 0;
        for (size_t p = open; (p = ptx.find(".param", p)) != std::string_view::npos && p < close; p += 6)
            ++params;
        const KernelInfo* found = nullptr;
        for (const KernelInfo& k : KERNELS)
            if (name == k.name) found = &k;
        if (!found) {
            std::fprintf(stderr, "cuda model: the PTX has an entry %s that the model does not know\n",
                         name.c_str());
            return CUDA_ERROR_INVALID_IMAGE;
        }
        if (found->params != params) {
            std::fprintf(stderr,
                         "cuda model: entry %s has %zu parameters in the PTX, %zu in the source\n",
                         name.c_str(), params, found->params);
            return CUDA_ERROR_INVALID_IMAGE;
        }
        m->functions.push_back(std::make_unique<Function>(Function{found}));
        m->by_name[name] = m->functions.back().get();
        at = close;
    }
    if (m->functions.empty()) return CUDA_ERROR_INVALID_IMAGE;
    *module = m.release();
    return CUDA_SUCCESS;
}

CUresult cuModuleUnload(void* module) {
    Guard g;
    delete static_cast<Module*>(module);
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
    Guard g;
    if (!function || !module || !name) return CUDA_ERROR_INVALID_VALUE;
    auto* m = static_cast<Module*>(module);
    auto it = m->by_name.find(name);
    if (it == m->by_name.end()) return CUDA_ERROR_NOT_FOUND;
    *function = it->second;
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(void* function, int attribute, int value) {
    Guard g;
    if (!function) return CUDA_ERROR_INVALID_HANDLE;
    auto* f = static_cast<Function*>(function);
    if (attribute == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > MAX_DYNAMIC_SMEM_OPTIN) return CUDA_ERROR_INVALID_VALUE;
        f->max_dynamic_smem = value;
    }
    return CUDA_SUCCESS;
}

CUresult cuFuncGetAttribute(int* value, int attribute, void* function) {
    if (!value || !function) return CUDA_ERROR_INVALID_VALUE;
    auto* f = static_cast<Function*>(function);
    switch (attribute) {
        case 0: *value = 1024; break;  // max threads per block
        case 8: *value = f->max_dynamic_smem; break;
        default: *value = 0; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned smem, void*, void** params,
                        void** extra) {
    Guard g;
    if (CUresult s = status_in_context("cuLaunchKernel")) return s;
    if (!function) return CUDA_ERROR_INVALID_HANDLE;
    auto* f = static_cast<Function*>(function);
    const char* name = f->kernel->name;
    if (extra != nullptr || (f->kernel->params > 0 && params == nullptr)) {
        std::fprintf(stderr, "cuda model: %s launched without its parameter array\n", name);
        return CUDA_ERROR_INVALID_VALUE;
    }
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || threads == 0 || gy > 65535 || gz > 65535 ||
        gx > 0x7fffffffu || bx > 1024 || by > 1024 || bz > 64) {
        std::fprintf(stderr, "cuda model: %s launched with grid (%u, %u, %u), block (%u, %u, %u)\n",
                     name, gx, gy, gz, bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (threads > 1024) {
        std::fprintf(stderr, "cuda model: %s launched with %llu threads per block\n", name, threads);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((int)smem > f->max_dynamic_smem) {
        std::fprintf(stderr,
                     "cuda model: %s asks for %u bytes of dynamic shared memory; the kernel "
                     "allows %d (raise it with cuFuncSetAttribute)\n",
                     name, smem, f->max_dynamic_smem);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (threads % 32 != 0 || smem > emu::DYN_SMEM_BYTES) {
        std::fprintf(stderr, "cuda model: %s: blocks of %llu threads are not modelled (whole warps only)\n",
                     name, threads);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    trace_line("launch", (size_t)gx * gy * gz, name);
    const Trampoline run = f->kernel->run;
    emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), smem, [&] { run(params); });
    const std::string after = std::string("kernel ") + name;
    return guards_intact(after.c_str()) ? CUDA_SUCCESS : CUDA_ERROR_ILLEGAL_ADDRESS;
}

}  // extern "C"
