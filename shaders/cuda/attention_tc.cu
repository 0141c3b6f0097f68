// Multi-head attention on the tensor cores (FlashAttention-2 scheme): q, k, v [B, L, H, D] f32,
// rounded to bf16 for the two products, scores, softmax and the output accumulated in f32;
// optional additive bias [B or 1, H or 1, Lq, Lk] (f32); out [B, Lq, H, D] f32.
//
// Two passes:
//  1. `attention_pack_k_bf16` / `attention_pack_vt_bf16` round k and v to bf16 once per call,
//     k as [B*H, Lk_pad, D] and v transposed as [B*H, D, Lk_pad] (Lk_pad: Lk rounded up to the
//     key tile, the padding zero), so every tile below is a straight 16-byte copy.
//  2. `attention_tc_d{16,32,64,128}`: grid (Lq / 64, B*H), 4 warps, 16 query rows per warp.
//     The warp keeps its query rows as mma A fragments in registers for the whole call. Per
//     tile of 64 keys (K and V^T staged in shared memory by cp.async, the next tile's K
//     fetched during this tile's softmax and P V, its V during the next Q K^T), S = Q K^T
//     comes out of mma.m16n8k16 in the accumulator layout (thread = row g / g+8, columns 2t,
//     2t+1 of every 8-column block), the online softmax runs on those registers (row max and
//     sum over the 4 threads of a row by shuffles; exp2 with the scale folded in), and the
//     same registers, rounded to bf16, are the A fragments of P V. The output accumulator
//     stays in registers and is rescaled per row when the running max grows; the row sums are
//     combined across the quad once at the end. Scores never leave the registers.
//
// Fragment layouts are those the PTX ISA gives for mma.m16n8k16 with .bf16 inputs (groupID =
// lane >> 2, threadID_in_group = lane & 3); ldmatrix.x4 loads four 8x8 bf16 blocks whose row
// addresses lanes 8i..8i+7 supply for block i. Shared rows are padded by 16 bytes so the eight
// rows of one 8x8 block fall on distinct banks.
//
// Needs sm_80 (bf16 mma); built for older architectures the kernels trap, and the backend
// never launches them there.

#define TC_BM 64  // query rows per block
#define TC_BN 64  // keys per tile
#define TC_THREADS 128

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define TC_ENABLED 1
#else
#define TC_ENABLED 0
#endif
// The CPU test model of the kernels (crates/flux-cuda/tests/emu) supplies the warp-level
// operations below from their PTX ISA definitions instead of the instructions.
#if TC_ENABLED && !defined(FLUX_CUDA_EMULATOR)
#define TC_PTX 1
#else
#define TC_PTX 0
#endif

// Round-to-nearest-even bf16x2 of (lo, hi): lo in the low half (the lower column).
__device__ __forceinline__ u32 tc_pack_bf16x2(float lo, float hi) {
#if defined(FLUX_CUDA_EMULATOR)
    return emu::pack_bf16x2(lo, hi);
#elif TC_ENABLED
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
#endif
}

__device__ __forceinline__ u32 tc_smem_addr(const void* p) {
#if TC_PTX
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
#else
    return (u32)(unsigned long long)p;
#endif
}

// Four 8x8 bf16 blocks; this lane supplies the address of one row of block lane / 8.
__device__ __forceinline__ void tc_ldmatrix_x4(u32 r[4], const u16* row) {
#if defined(FLUX_CUDA_EMULATOR)
    emu::ldmatrix_x4(r, row);
#elif TC_ENABLED
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(tc_smem_addr(row)));
#else
    r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

// 16 bytes global -> shared without passing through registers (sm_80 cp.async).
__device__ __forceinline__ void tc_cp_async16(u16* dst, const u16* src) {
#if defined(FLUX_CUDA_EMULATOR)
    emu::cp_async16(dst, src);
#elif TC_ENABLED
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(tc_smem_addr(dst)), "l"(src)
                 : "memory");
#else
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void tc_cp_async_commit() {
#if defined(FLUX_CUDA_EMULATOR)
    emu::cp_async_commit();
#elif TC_ENABLED
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void tc_cp_async_wait() {
#if defined(FLUX_CUDA_EMULATOR)
    emu::cp_async_wait(N);
#elif TC_ENABLED
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// c += a b for one 16x8x16 tile (a: 16x16 row-major fragment, b: 16x8 column fragment).
__device__ __forceinline__ void tc_mma(float c[4], const u32 a[4], u32 b0, u32 b1) {
#if defined(FLUX_CUDA_EMULATOR)
    emu::mma_16816(c, a, b0, b1);
#elif TC_ENABLED
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// kb[bh, key, x] = bf16(k[b, key, h, x]), zero for lk <= key < lk_pad.
extern "C" __global__ void attention_pack_k_bf16(u16* kb, const float* k, u64 bh_count,
                                                 u64 lk, u64 lk_pad, u64 h, u64 d) {
    FOR_EACH(i, bh_count * lk_pad * d) {
        const u64 x = i % d, key = (i / d) % lk_pad, bh = i / (d * lk_pad);
        const u64 bi = bh / h, hi = bh % h;
        kb[i] = key < lk ? f32_to_bf16(k[(bi * lk + key) * h * d + hi * d + x]) : (u16)0;
    }
}

// vt[bh, x, key] = bf16(v[b, key, h, x]), zero for lk <= key < lk_pad. Grid (lk_pad / 32,
// d / 32, B*H) of 32x8 threads: a 32x32 tile is read along x and written along key.
extern "C" __global__ void attention_pack_vt_bf16(u16* vt, const float* v, u64 lk, u64 lk_pad,
                                                  u64 h, u64 d) {
    __shared__ u16 tile[32][33];
    const u64 bh = blockIdx.z, bi = bh / h, hi = bh % h;
    const u64 key0 = (u64)blockIdx.x * 32, x0 = (u64)blockIdx.y * 32;
    for (u32 j = threadIdx.y; j < 32; j += blockDim.y) {
        const u64 key = key0 + j, x = x0 + threadIdx.x;
        tile[j][threadIdx.x] =
            (key < lk && x < d) ? f32_to_bf16(v[(bi * lk + key) * h * d + hi * d + x]) : (u16)0;
    }
    __syncthreads();
    for (u32 j = threadIdx.y; j < 32; j += blockDim.y) {
        const u64 x = x0 + j, key = key0 + threadIdx.x;
        if (x < d && key < lk_pad) vt[(bh * d + x) * lk_pad + key] = tile[threadIdx.x][j];
    }
}

template <int D>
__device__ __forceinline__ void attention_tc(float* out, const float* q, const u16* kb,
                                             const u16* vt, const float* bias, u64 lq, u64 lk,
                                             u64 lk_pad, u64 h, double scale, int has_bias,
                                             u64 bias_b, u64 bias_h) {
#if TC_ENABLED
    constexpr int KS = D + 8;      // K tile row stride (bf16 elements)
    constexpr int VS = TC_BN + 8;  // V^T tile row stride
    constexpr int DK = D / 16;     // k-steps of Q K^T
    constexpr int NS = TC_BN / 8;  // 8-key column blocks of S
    constexpr int ND = D / 8;      // 8-column blocks of the output
    __shared__ __align__(16) u16 ks[TC_BN * KS];
    __shared__ __align__(16) u16 vs[D * VS];
    const float log2e = 1.4426950408889634f;
    const float sl2 = (float)scale * log2e;
    const float ninf = -FLUX_INF;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const u64 bh = blockIdx.y, bi = bh / h, hi = bh % h;
    const u64 hd = h * (u64)D;
    const u64 r_lo = (u64)blockIdx.x * TC_BM + (u64)warp * 16 + (u64)g;
    const u64 r_hi = r_lo + 8;

    // Query rows as A fragments: qf[kk] = rows g / g+8, columns 16kk + 2t (+1) and + 8.
    u32 qf[DK][4];
    {
        auto pair = [&](u64 row, int col) -> u32 {
            if (row >= lq) return 0u;
            const float2 v = *reinterpret_cast<const float2*>(
                q + (bi * lq + row) * hd + hi * (u64)D + (u64)col);
            return tc_pack_bf16x2(v.x, v.y);
        };
#pragma unroll
        for (int kk = 0; kk < DK; ++kk) {
            const int c = kk * 16 + 2 * t;
            qf[kk][0] = pair(r_lo, c);
            qf[kk][1] = pair(r_hi, c);
            qf[kk][2] = pair(r_lo, c + 8);
            qf[kk][3] = pair(r_hi, c + 8);
        }
    }
    const float* bias_base = nullptr;
    if (has_bias) {
        const u64 b0 = bias_b == 1 ? 0 : bi;
        const u64 h0 = bias_h == 1 ? 0 : hi;
        bias_base = bias + (b0 * bias_h + h0) * lq * lk;
    }

    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_lo = ninf, m_hi = ninf, l_lo = 0.0f, l_hi = 0.0f;

    const u16* kbase = kb + bh * lk_pad * (u64)D;
    const u16* vbase = vt + bh * (u64)D * lk_pad;
    // ldmatrix row of this lane: block lane / 8 = (column block + (lane >> 4), k half
    // (lane >> 3) & 1), row lane & 7 of the block.
    const int lr = (lane & 7) + ((lane >> 4) << 3);
    const int lc = ((lane >> 3) & 1) * 8;

    // Tiles arrive by cp.async: K of tile j + 1 is fetched while tile j's softmax and P V run,
    // V of tile j + 1 while tile j + 1's Q K^T runs (one buffer each; groups complete in order).
    auto fetch_k = [&](u64 j0) {
        for (int c = threadIdx.x; c < TC_BN * D / 8; c += TC_THREADS) {
            const int r = c / (D / 8), x = (c % (D / 8)) * 8;
            tc_cp_async16(&ks[r * KS + x], kbase + (j0 + (u64)r) * D + (u64)x);
        }
        tc_cp_async_commit();
    };
    auto fetch_v = [&](u64 j0) {
        for (int c = threadIdx.x; c < D * TC_BN / 8; c += TC_THREADS) {
            const int r = c / (TC_BN / 8), x = (c % (TC_BN / 8)) * 8;
            tc_cp_async16(&vs[r * VS + x], vbase + (u64)r * lk_pad + j0 + (u64)x);
        }
        tc_cp_async_commit();
    };
    fetch_k(0);
    fetch_v(0);

    for (u64 j0 = 0; j0 < lk; j0 += TC_BN) {
        const bool more = j0 + TC_BN < lk;
        tc_cp_async_wait<1>();  // K of this tile (its V may still be in flight)
        __syncthreads();

        // S = Q K^T: B fragment of key block n = K rows 8n + g, columns 16kk + 2t (+8).
        float s[NS][4];
#pragma unroll
        for (int n = 0; n < NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DK; ++kk) {
#pragma unroll
            for (int n = 0; n < NS; n += 2) {
                u32 b[4];  // b[0], b[1]: key block n; b[2], b[3]: key block n + 1
                tc_ldmatrix_x4(b, &ks[(n * 8 + lr) * KS + kk * 16 + lc]);
                tc_mma(s[n], qf[kk], b[0], b[1]);
                tc_mma(s[n + 1], qf[kk], b[2], b[3]);
            }
        }

        __syncthreads();  // every warp is done with ks
        if (more) fetch_k(j0 + TC_BN);

        // Scores in the log2 domain; keys past the end masked.
        float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u64 key = j0 + (u64)(n * 8 + 2 * t + (e & 1));
                const u64 row = e < 2 ? r_lo : r_hi;
                float x = s[n][e] * sl2;
                if (key >= lk) {
                    x = ninf;
                } else if (has_bias && row < lq) {
                    x += bias_base[row * lk + key] * log2e;
                }
                s[n][e] = x;
            }
            mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
        }
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        // A row whose scores are all masked so far keeps 0 as its reference: exp2(-inf) = 0.
        const float ref_lo = mx_lo == ninf ? 0.0f : mx_lo;
        const float ref_hi = mx_hi == ninf ? 0.0f : mx_hi;
        const float corr_lo = exp2f(m_lo - ref_lo);
        const float corr_hi = exp2f(m_hi - ref_hi);
        m_lo = mx_lo;
        m_hi = mx_hi;
        float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
            s[n][0] = exp2f(s[n][0] - ref_lo);
            s[n][1] = exp2f(s[n][1] - ref_lo);
            s[n][2] = exp2f(s[n][2] - ref_hi);
            s[n][3] = exp2f(s[n][3] - ref_hi);
            sum_lo += s[n][0] + s[n][1];
            sum_hi += s[n][2] + s[n][3];
        }
        l_lo = l_lo * corr_lo + sum_lo;
        l_hi = l_hi * corr_hi + sum_hi;
#pragma unroll
        for (int n = 0; n < ND; ++n) {
            o[n][0] *= corr_lo;
            o[n][1] *= corr_lo;
            o[n][2] *= corr_hi;
            o[n][3] *= corr_hi;
        }

        if (more) {
            tc_cp_async_wait<1>();  // V of this tile (the next K may still be in flight)
        } else {
            tc_cp_async_wait<0>();
        }
        __syncthreads();

        // O += P V: the S accumulators of key blocks 2kk and 2kk + 1 are the A fragment of
        // keys 16kk..16kk+15; B fragment of output block n = V^T rows 8n + g, keys 16kk + 2t.
#pragma unroll
        for (int kk = 0; kk < TC_BN / 16; ++kk) {
            const u32 a[4] = {
                tc_pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                tc_pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                tc_pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                tc_pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
#pragma unroll
            for (int n = 0; n < ND; n += 2) {
                u32 b[4];
                tc_ldmatrix_x4(b, &vs[(n * 8 + lr) * VS + kk * 16 + lc]);
                tc_mma(o[n], a, b[0], b[1]);
                tc_mma(o[n + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done with vs
        if (more) fetch_v(j0 + TC_BN);
    }

    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;
#pragma unroll
    for (int n = 0; n < ND; ++n) {
        const u64 col = hi * (u64)D + (u64)(n * 8 + 2 * t);
        if (r_lo < lq) {
            *reinterpret_cast<float2*>(out + (bi * lq + r_lo) * hd + col) =
                make_float2(o[n][0] * inv_lo, o[n][1] * inv_lo);
        }
        if (r_hi < lq) {
            *reinterpret_cast<float2*>(out + (bi * lq + r_hi) * hd + col) =
                make_float2(o[n][2] * inv_hi, o[n][3] * inv_hi);
        }
    }
#else
    __trap();
#endif
}

#define ATTENTION_TC(D)                                                                       \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attention_tc_d##D(             \
        float* out, const float* q, const u16* kb, const u16* vt, const float* bias, u64 lq,  \
        u64 lk, u64 lk_pad, u64 h, double scale, int has_bias, u64 bias_b, u64 bias_h) {      \
        attention_tc<D>(out, q, kb, vt, bias, lq, lk, lk_pad, h, scale, has_bias, bias_b,     \
                        bias_h);                                                              \
    }

ATTENTION_TC(16)
ATTENTION_TC(32)
ATTENTION_TC(64)
ATTENTION_TC(128)
