// A small CUDA execution model on CPU threads, for running the SIMT kernels of shaders/cuda as
// ordinary C++ on machines without a GPU: it checks the kernels' index arithmetic, shared-memory
// staging, warp shuffles and block reductions, not their speed or the GPU's rounding (the
// compiler here does not fuse multiply-adds as NVRTC does).
//
// Model: one OS thread per CUDA thread of a block; the blocks of a grid run one after another on
// those threads (so `__shared__` variables, which become `static`, are shared by exactly one
// block at a time). `__syncthreads` is a barrier of the block's threads, a warp shuffle a
// write-barrier-read-barrier exchange among the warp's 32 threads. Dynamic shared memory
// (`extern __shared__`) is rewritten by the test driver into a pointer to `emu::dyn_smem`,
// filled with 0xff bytes (NaN for floats) before each launch so that reading shared memory no
// thread wrote shows up in the results.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

struct Idx {
    unsigned x, y, z;
};

inline thread_local Idx thread_idx{0, 0, 0};
inline thread_local Idx block_idx{0, 0, 0};
inline Idx block_dim{1, 1, 1};
inline Idx grid_dim{1, 1, 1};
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<uint64_t> exchange;
constexpr size_t DYN_SMEM_BYTES = 1 << 20;
alignas(16) inline unsigned char dyn_smem[DYN_SMEM_BYTES];

inline unsigned linear_thread() {
    return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
}

template <typename T>
T shuffle_from(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    const unsigned me = linear_thread();
    const unsigned warp = me / 32;
    std::memcpy(&exchange[me], &v, sizeof(T));
    warp_barriers[warp]->arrive_and_wait();
    T r;
    std::memcpy(&r, &exchange[warp * 32 + (src_lane & 31u)], sizeof(T));
    warp_barriers[warp]->arrive_and_wait();
    return r;
}

// Runs `kernel()` (a closure calling the `__global__` function with its arguments) over the
// grid, as a launch with `smem` bytes of dynamic shared memory.
template <typename K>
void launch(dim3 grid, dim3 block, size_t smem, K kernel) {
    const unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024 || n % 32 != 0) {
        std::fprintf(stderr, "emu: block of %u threads (need a multiple of 32, at most 1024)\n", n);
        std::abort();
    }
    if (smem > DYN_SMEM_BYTES) {
        std::fprintf(stderr, "emu: %zu bytes of dynamic shared memory requested\n", smem);
        std::abort();
    }
    std::memset(dyn_smem, 0xff, smem);
    block_dim = {block.x, block.y, block.z};
    grid_dim = {grid.x, grid.y, grid.z};
    std::barrier<> bar(n);
    block_barrier = &bar;
    warp_barriers.clear();
    for (unsigned w = 0; w < n / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    exchange.assign(n, 0);
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned t = 0; t < n; ++t) {
        threads.emplace_back([&, t] {
            thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            for (unsigned bz = 0; bz < grid.z; ++bz)
                for (unsigned by = 0; by < grid.y; ++by)
                    for (unsigned bx = 0; bx < grid.x; ++bx) {
                        block_idx = {bx, by, bz};
                        kernel();
                        // The next block reuses the shared variables: wait for every thread.
                        bar.arrive_and_wait();
                    }
        });
    }
    for (auto& th : threads) th.join();
    block_barrier = nullptr;
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

[[noreturn]] inline void __trap() {
    std::fprintf(stderr, "emu: a kernel trapped\n");
    std::abort();
}

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    return emu::shuffle_from(v, (emu::linear_thread() & 31u) ^ (unsigned)lane_mask);
}

template <typename T>
T __shfl_sync(unsigned, T v, int src_lane) {
    return emu::shuffle_from(v, (unsigned)src_lane);
}

inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline float __uint_as_float(unsigned v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned v;
    std::memcpy(&v, &f, 4);
    return v;
}

// Round-to-nearest-even float -> IEEE half bits (what `cvt.rn.f16.f32` computes).
inline unsigned short flux_emu_f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}

using std::erf;
using std::exp;
using std::fabs;
using std::fmax;
using std::sqrt;
using std::tanh;
