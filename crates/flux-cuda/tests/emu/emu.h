// A small CUDA execution model on the CPU, for running the SIMT kernels of shaders/cuda as
// ordinary C++ on machines without a GPU: it checks the kernels' index arithmetic, shared-memory
// staging, warp shuffles and block reductions, not their speed or the GPU's rounding (the
// compiler here does not fuse multiply-adds as NVRTC does).
//
// Model: each CUDA thread of a block is a fiber (its own stack, switched in user space on the
// calling OS thread); the blocks of a grid run one after another on those fibers (so
// `__shared__` variables, which become `static`, are shared by exactly one block at a time).
// `__syncthreads` is a barrier of the block's fibers, a warp shuffle a
// write-barrier-read-barrier exchange among the warp's 32 fibers; a fiber runs until it waits at
// a barrier, then the next runnable one runs, so a thread that would wait forever on the GPU
// (a barrier only some threads reach) is reported as a deadlock. Dynamic shared memory
// (`extern __shared__`) is rewritten by the test driver into a pointer to `emu::dyn_smem`,
// filled with 0xff bytes (NaN for floats) before each launch so that reading shared memory no
// thread wrote shows up in the results. The sm_80 warp-level operations of the tensor-core
// attention (`ldmatrix.x4`, `mma.sync.m16n8k16` with bf16 operands, `cp.async` groups, whose
// copies land only when a wait retires them) are modelled from the PTX ISA's definitions.
#pragma once

#include <array>
#include <bit>
#include <deque>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <functional>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#include <vector>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

struct Idx {
    unsigned x, y, z;
};

inline Idx block_dim{1, 1, 1};
inline Idx grid_dim{1, 1, 1};
// Per-lane slots of the warp-wide tensor-core operations (operand registers, addresses).
constexpr int WIDE = 12;
constexpr size_t DYN_SMEM_BYTES = 1 << 20;
alignas(16) inline unsigned char dyn_smem[DYN_SMEM_BYTES];

// ---- fibers ----

// A saved execution context: on x86-64 the stack pointer of a stack holding the callee-saved
// registers (see `emu_switch`), elsewhere a ucontext.
struct Context {
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t uc{};
#endif
};

#if defined(__x86_64__)
// Saves the callee-saved registers and the stack pointer into *from, loads `to`'s.
extern "C" void flux_emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl flux_emu_switch
    .hidden flux_emu_switch
    .type flux_emu_switch, @function
flux_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size flux_emu_switch, .-flux_emu_switch
)");
inline void switch_context(Context& from, Context& to) { flux_emu_switch(&from.sp, to.sp); }
// A context that starts `entry` (which never returns) on the stack [stack, stack + size).
inline void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<uint64_t*>(top);
    slot[-1] = 0;                                          // entry's (absent) return address
    slot[-2] = reinterpret_cast<uint64_t>(entry);          // where the first switch returns to
    for (int i = 3; i <= 8; ++i) slot[-i] = 0;             // rbp, rbx, r12-r15
    c.sp = &slot[-8];
}
#else
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

struct Barrier {
    unsigned needed = 0, count = 0;
    uint64_t generation = 0;
};

struct AsyncCopy {
    void* dst;
    const void* src;
};

// One CUDA thread.
struct Fiber {
    Context context;
    Idx tid{0, 0, 0};
    Idx bid{0, 0, 0};
    unsigned linear = 0;
    const Barrier* waiting = nullptr;
    uint64_t waiting_generation = 0;
    bool done = false;
    // `cp.async` copies not yet committed, and the committed groups not yet waited for.
    std::vector<AsyncCopy> open_group;
    std::deque<std::vector<AsyncCopy>> committed;
};

constexpr size_t STACK_BYTES = 256 * 1024;
inline std::vector<std::unique_ptr<unsigned char[]>> stacks;  // reused across launches
inline std::vector<Fiber> fibers;
inline Fiber* cur = nullptr;
inline Context scheduler;
inline Barrier block_barrier;
inline std::vector<Barrier> warp_barriers;
inline std::vector<uint64_t> exchange;
inline std::vector<std::array<uint64_t, WIDE>> wide;
inline const std::function<void()>* body = nullptr;

inline void yield() { switch_context(cur->context, scheduler); }

// Waits until every participant of `b` has arrived (the last to arrive goes on at once).
inline void arrive_and_wait(Barrier& b) {
    if (++b.count == b.needed) {
        b.count = 0;
        ++b.generation;
        return;
    }
    cur->waiting = &b;
    cur->waiting_generation = b.generation;
    yield();
}

inline unsigned linear_thread() { return cur->linear; }

inline void fiber_main() {
    Fiber* self = cur;
    for (unsigned bz = 0; bz < grid_dim.z; ++bz)
        for (unsigned by = 0; by < grid_dim.y; ++by)
            for (unsigned bx = 0; bx < grid_dim.x; ++bx) {
                self->bid = {bx, by, bz};
                (*body)();
                // The next block reuses the shared variables: wait for every thread.
                arrive_and_wait(block_barrier);
            }
    self->done = true;
    yield();
    std::abort();  // a finished fiber is never resumed
}

template <typename T>
T shuffle_from(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    const unsigned me = linear_thread();
    const unsigned warp = me / 32;
    std::memcpy(&exchange[me], &v, sizeof(T));
    arrive_and_wait(warp_barriers[warp]);
    T r;
    std::memcpy(&r, &exchange[warp * 32 + (src_lane & 31u)], sizeof(T));
    arrive_and_wait(warp_barriers[warp]);
    return r;
}

// Runs `kernel()` (a closure calling the `__global__` function with its arguments) over the
// grid, as a launch with `smem` bytes of dynamic shared memory, on the calling thread.
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
    const std::function<void()> run = kernel;
    body = &run;
    block_barrier = Barrier{n};
    warp_barriers.assign(n / 32, Barrier{32});
    exchange.assign(n, 0);
    wide.assign(n, {});
    while (stacks.size() < n) stacks.push_back(std::make_unique_for_overwrite<unsigned char[]>(STACK_BYTES));
    fibers.assign(n, Fiber{});
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = fibers[t];
        f.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        f.linear = t;
        make_context(f.context, stacks[t].get(), STACK_BYTES, &fiber_main);
    }
    for (;;) {
        bool live = false, ran = false;
        for (Fiber& f : fibers) {
            if (f.done) continue;
            live = true;
            if (f.waiting && f.waiting->generation == f.waiting_generation) continue;
            f.waiting = nullptr;
            cur = &f;
            switch_context(scheduler, f.context);
            ran = true;
        }
        if (!live) break;
        if (!ran) {
            std::fprintf(stderr, "emu: deadlock: every live thread waits at a barrier the others "
                                 "never reach\n");
            std::abort();
        }
    }
    cur = nullptr;
    body = nullptr;
}

// ---- sm_80 warp-level operations of the tensor-core attention, from the PTX ISA ----

inline float bf16_bits_to_float(uint32_t h) { return std::bit_cast<float>(h << 16); }

inline uint16_t float_to_bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// `cvt.rn.bf16x2.f32 d, hi, lo`: lo in the low half.
inline uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)float_to_bf16_bits(lo) | ((uint32_t)float_to_bf16_bits(hi) << 16);
}

// `ldmatrix.sync.aligned.m8n8.x4.shared.b16`: lane l gives the address of row l % 8 of matrix
// l / 8; it receives, for each matrix j, the two 16-bit elements 2 (l % 4), 2 (l % 4) + 1 of
// row l / 4.
inline void ldmatrix_x4(uint32_t r[4], const uint16_t* row) {
    const unsigned me = linear_thread(), warp = me / 32, lane = me % 32;
    wide[me][0] = (uint64_t)(uintptr_t)row;
    arrive_and_wait(warp_barriers[warp]);
    for (int j = 0; j < 4; ++j) {
        const auto* src = (const uint16_t*)(uintptr_t)wide[warp * 32 + j * 8 + lane / 4][0];
        std::memcpy(&r[j], src + 2 * (lane % 4), 4);
    }
    arrive_and_wait(warp_barriers[warp]);
}

// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, c` with d = c in place.
// Fragments (g = lane / 4, t = lane % 4): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 =
// A[g][2t+8..], a3 = A[g+8][2t+8..]; b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; c0, c1 =
// C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]. Products are exact; the sum is
// taken in double and rounded once (the hardware's order of f32 additions is unspecified).
inline void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    const unsigned me = linear_thread(), warp = me / 32, lane = me % 32;
    auto& slot = wide[me];
    for (int i = 0; i < 4; ++i) slot[i] = a[i];
    slot[4] = b0;
    slot[5] = b1;
    arrive_and_wait(warp_barriers[warp]);
    auto a_at = [&](unsigned r, unsigned k) {
        const auto& s = wide[warp * 32 + (r % 8) * 4 + (k % 8) / 2];
        const uint32_t reg = (uint32_t)s[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
        return bf16_bits_to_float(k % 2 ? reg >> 16 : reg & 0xffffu);
    };
    auto b_at = [&](unsigned k, unsigned n) {
        const auto& s = wide[warp * 32 + n * 4 + (k % 8) / 2];
        const uint32_t reg = (uint32_t)s[4 + (k >= 8 ? 1 : 0)];
        return bf16_bits_to_float(k % 2 ? reg >> 16 : reg & 0xffffu);
    };
    const unsigned g = lane / 4, t = lane % 4;
    float d[4];
    for (int e = 0; e < 4; ++e) {
        const unsigned r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
        double acc = c[e];
        for (unsigned k = 0; k < 16; ++k) acc += (double)a_at(r, k) * (double)b_at(k, n);
        d[e] = (float)acc;
    }
    arrive_and_wait(warp_barriers[warp]);
    for (int e = 0; e < 4; ++e) c[e] = d[e];
}

// `cp.async.cg.shared.global` (16 bytes), `commit_group`, `wait_group N`: the copies of a
// thread are held back until a wait retires their group, so reading a tile before waiting for
// it sees stale (poisoned) shared memory, as it might on the GPU.
inline void cp_async16(void* dst, const void* src) { cur->open_group.push_back({dst, src}); }
inline void cp_async_commit() {
    cur->committed.push_back(std::move(cur->open_group));
    cur->open_group.clear();
}
inline void cp_async_wait(int pending) {
    auto& committed = cur->committed;
    while ((int)committed.size() > pending) {
        for (const AsyncCopy& c : committed.front()) std::memcpy(c.dst, c.src, 16);
        committed.pop_front();
    }
}

}  // namespace emu

struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::cur->bid)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
// Listing the kernels (the model driver's build): `__global__` becomes a marker in the
// preprocessed source.
#ifdef FLUX_EMU_LIST_KERNELS
#define __global__ FLUX_EMU_KERNEL
#else
#define __global__
#endif
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

[[noreturn]] inline void __trap() {
    std::fprintf(stderr, "emu: a kernel trapped\n");
    std::abort();
}

inline void __syncthreads() { emu::arrive_and_wait(emu::block_barrier); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    return emu::shuffle_from(v, (emu::linear_thread() & 31u) ^ (unsigned)lane_mask);
}

template <typename T>
T __shfl_sync(unsigned, T v, int src_lane) {
    return emu::shuffle_from(v, (unsigned)src_lane);
}

inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }

// Round-to-nearest-even float -> IEEE half bits (what `cvt.rn.f16.f32` computes).
inline unsigned short flux_emu_f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}

using std::erf;
using std::isfinite;
using std::exp;
using std::fabs;
using std::fmax;
using std::sqrt;
using std::tanh;
