// Data movement: permutes, strided row copies (concat, narrow, channel slices), row gathers and
// row broadcasts.

// out[i] = x[offset(i)] for an output of shape s0..s5 (unused leading dims are 1) whose
// dimension k steps `st_k` elements through the input.
template <typename T>
__device__ void permute(T* out, const T* x, u64 n, u64 s0, u64 s1, u64 s2, u64 s3, u64 s4,
                        u64 s5, u64 st0, u64 st1, u64 st2, u64 st3, u64 st4, u64 st5) {
    const u64 s[6] = {s0, s1, s2, s3, s4, s5};
    const u64 st[6] = {st0, st1, st2, st3, st4, st5};
    FOR_EACH(i, n) {
        u64 rem = i, off = 0;
        for (int k = 5; k >= 0; --k) {
            off += (rem % s[k]) * st[k];
            rem /= s[k];
        }
        out[i] = x[off];
    }
}

// dst[o * dst_stride + dst_off + j] = src[o * src_stride + src_off + j] for o < outer, j < len.
template <typename T>
__device__ void copy_rows(T* dst, const T* src, u64 outer, u64 len, u64 dst_stride,
                          u64 dst_off, u64 src_stride, u64 src_off) {
    const u64 n = outer * len;
    FOR_EACH(i, n) {
        const u64 o = i / len, j = i % len;
        dst[o * dst_stride + dst_off + j] = src[o * src_stride + src_off + j];
    }
}

// out [rows, n] = bias [n] repeated (the initial value of a GEMM that adds its result).
template <typename T>
__device__ void broadcast_rows(T* out, const T* bias, u64 rows, u64 n) {
    const u64 total = rows * n;
    FOR_EACH(i, total) out[i] = bias[i % n];
}

// Rows of a table in any stored dtype, copied as bytes: out[r] = table[ids[r]].
extern "C" __global__ void gather_rows_bytes(u8* out, const u8* table, const u64* ids,
                                             u64 rows, u64 row_bytes) {
    const u64 n = rows * row_bytes;
    FOR_EACH(i, n) {
        const u64 r = i / row_bytes, j = i % row_bytes;
        out[i] = table[ids[r] * row_bytes + j];
    }
}

#define LAYOUT(T, S)                                                                          \
    extern "C" __global__ void permute_##S(T* out, const T* x, u64 n, u64 s0, u64 s1, u64 s2,  \
                                           u64 s3, u64 s4, u64 s5, u64 st0, u64 st1, u64 st2, \
                                           u64 st3, u64 st4, u64 st5) {                       \
        permute<T>(out, x, n, s0, s1, s2, s3, s4, s5, st0, st1, st2, st3, st4, st5);          \
    }                                                                                         \
    extern "C" __global__ void copy_rows_##S(T* dst, const T* src, u64 outer, u64 len,         \
                                             u64 dst_stride, u64 dst_off, u64 src_stride,     \
                                             u64 src_off) {                                   \
        copy_rows<T>(dst, src, outer, len, dst_stride, dst_off, src_stride, src_off);         \
    }                                                                                         \
    extern "C" __global__ void broadcast_rows_##S(T* out, const T* bias, u64 rows, u64 n) {    \
        broadcast_rows<T>(out, bias, rows, n);                                                \
    }

INSTANTIATE_F32_F64(LAYOUT)
