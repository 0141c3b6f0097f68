// Flash-attention style multi-head attention: q [B, Lq, H, D], k, v [B, Lk, H, D], optional
// additive bias [B or 1, H or 1, Lq, Lk]; out [B, Lq, H, D].
//
// Grid: (query blocks, B * H). Each block stages its query rows and a tile of `bk` (<= 32) keys
// and values in shared memory; each warp owns ATT_ROWS query rows. Per tile, lane j scores key
// j against the row, the warp forms the tile's max and sum with shuffles (online softmax: the
// running max and denominator rescale the accumulator), then every lane accumulates its slice
// of D (d = lane + 32 v). The score matrix never exists beyond one tile; accumulation in T.

#define ATT_ROWS 2
#define ATT_MAXV 8  // D <= 32 * ATT_MAXV = 256

template <typename T>
__device__ void attention(T* out, const T* q, const T* k, const T* v, const T* bias,
                          u64 lq, u64 lk, u64 h, u64 d, double scale, int has_bias,
                          u64 bias_b, u64 bias_h, u64 bk) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* smem = reinterpret_cast<T*>(smem_raw);
    const u64 kstride = d + 1;  // padding keeps lanes on different banks
    T* ks = smem;                   // [bk, d + 1]
    T* vs = ks + bk * kstride;      // [bk, d]
    T* qs = vs + bk * d;            // [rows_per_block, d]

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const u64 rows_per_block = (u64)warps * ATT_ROWS;
    const u64 bh = blockIdx.y;
    const u64 bi = bh / h, hi = bh % h;
    const u64 hd = h * d;
    const u64 q0 = (u64)blockIdx.x * rows_per_block;
    const T alpha = (T)scale;

    for (u64 t = threadIdx.x; t < rows_per_block * d; t += blockDim.x) {
        const u64 r = t / d, j = t % d;
        const u64 row = q0 + r;
        qs[t] = row < lq ? q[(bi * lq + row) * hd + hi * d + j] : (T)0;
    }

    T m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][ATT_MAXV];
    for (int r = 0; r < ATT_ROWS; ++r) {
        m[r] = neg_inf<T>();
        l[r] = (T)0;
        for (int x = 0; x < ATT_MAXV; ++x) acc[r][x] = (T)0;
    }
    const T* bias_base = nullptr;
    if (has_bias) {
        const u64 b0 = bias_b == 1 ? 0 : bi;
        const u64 h0 = bias_h == 1 ? 0 : hi;
        bias_base = bias + (b0 * bias_h + h0) * lq * lk;
    }

    for (u64 j0 = 0; j0 < lk; j0 += bk) {
        __syncthreads();
        for (u64 t = threadIdx.x; t < bk * d; t += blockDim.x) {
            const u64 j = t / d, x = t % d;
            const u64 key = j0 + j;
            const bool in = key < lk;
            const u64 src = (bi * lk + key) * hd + hi * d + x;
            ks[j * kstride + x] = in ? k[src] : (T)0;
            vs[j * d + x] = in ? v[src] : (T)0;
        }
        __syncthreads();
        for (int r = 0; r < ATT_ROWS; ++r) {
            const u64 rl = (u64)warp * ATT_ROWS + r;
            const u64 row = q0 + rl;
            if (row >= lq) break;  // uniform across the warp
            const u64 key = j0 + (u64)lane;
            T s = neg_inf<T>();
            if ((u64)lane < bk && key < lk) {
                const T* qr = qs + rl * d;
                const T* kr = ks + (u64)lane * kstride;
                T dot = (T)0;
                for (u64 x = 0; x < d; ++x) dot += qr[x] * kr[x];
                s = dot * alpha;
                if (has_bias) s = s + bias_base[row * lk + key];
            }
            const T mt = warp_max(s);
            const T mn = mt > m[r] ? mt : m[r];
            if (mn == neg_inf<T>()) continue;  // every score so far masked
            const T p = s == neg_inf<T>() ? (T)0 : flux_exp(s - mn);
            const T corr = flux_exp(m[r] - mn);
            l[r] = l[r] * corr + warp_sum(p);
            m[r] = mn;
            for (int x = 0; x < ATT_MAXV; ++x) acc[r][x] *= corr;
            const int kmax = (int)(bk < lk - j0 ? bk : lk - j0);
            for (int j = 0; j < kmax; ++j) {
                const T pj = __shfl_sync(0xffffffffu, p, j);
                const T* vr = vs + (u64)j * d;
                for (int x = 0; x < ATT_MAXV; ++x) {
                    const u64 dd = (u64)lane + 32u * (u64)x;
                    if (dd < d) acc[r][x] += pj * vr[dd];
                }
            }
        }
    }
    for (int r = 0; r < ATT_ROWS; ++r) {
        const u64 row = q0 + (u64)warp * ATT_ROWS + r;
        if (row >= lq) break;
        const T inv = (T)1 / l[r];
        for (int x = 0; x < ATT_MAXV; ++x) {
            const u64 dd = (u64)lane + 32u * (u64)x;
            if (dd < d) out[(bi * lq + row) * hd + hi * d + dd] = acc[r][x] * inv;
        }
    }
}

#define ATTENTION(T, S)                                                                       \
    extern "C" __global__ void attention_##S(T* out, const T* q, const T* k, const T* v,       \
                                             const T* bias, u64 lq, u64 lk, u64 h, u64 d,     \
                                             double scale, int has_bias, u64 bias_b,          \
                                             u64 bias_h, u64 bk) {                            \
        attention<T>(out, q, k, v, bias, lq, lk, h, d, scale, has_bias, bias_b, bias_h, bk);  \
    }

INSTANTIATE_F32_F64(ATTENTION)
