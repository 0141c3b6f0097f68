#!/usr/bin/env python3
"""Lane-level model of shaders/cuda/attention_tc.cu, run on the CPU with numpy.

Every lane's fragments are built the way the kernel builds them (query pairs, ldmatrix row
addresses, the score accumulators reused as the A fragments of P V, the quad reductions), and
mma.m16n8k16 and ldmatrix.x4 are applied as the PTX ISA defines their fragment layouts. The
result is compared with float64 attention:

    scripts/attention_tc_model.py          bf16 rounding as on the device: rel_l2 a few 1e-3
    scripts/attention_tc_model.py exact    no rounding: rel_l2 ~1e-7 (checks the index math)

It checks the kernel's arithmetic and indexing without a GPU; it does not model the copies'
timing (cp.async groups, barriers). Keep it in step with the kernel when either changes.
Needs numpy. Exits non-zero when a case is off.
"""

import sys

import numpy as np

ROUND = not (len(sys.argv) > 1 and sys.argv[1] == "exact")


def bf16(x):
    """Round-to-nearest-even to bf16 (kept as float32), or nothing in exact mode."""
    x = np.asarray(x, np.float32)
    if not ROUND:
        return x
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


BM, BN = 64, 64


def mma(c, a, b):
    """c += A B for one warp: c[lane][4] (c0..c3), a[lane][8] (a0..a7), b[lane][4] (b0..b3),
    placed in the 16x16, 16x8 and 16x8 matrices as the PTX ISA's fragment layouts of
    mma.m16n8k16 (.bf16 inputs, .f32 accumulators) say (groupID = lane >> 2,
    threadID_in_group = lane & 3). Products are summed in float64: the model checks indexing."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(8):
            row = g if (i < 2 or 4 <= i < 6) else g + 8
            col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = a[lane][i]
        for i in range(4):
            row = t * 2 + (i & 1) + (8 if i >= 2 else 0)
            B[row, g] = b[lane][i]
    C = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(4):
            row = g if i < 2 else g + 8
            c[lane][i] += C[row, t * 2 + (i & 1)]


def ldmatrix_x4(smem, addr):
    """ldmatrix.x4 of 16-bit elements: lanes 8m..8m+7 give the row offsets (addr[lane]) of
    matrix m; register m of a lane holds row lane / 4, columns 2 (lane % 4) and + 1 of matrix m.
    Returns r[lane][register][half]."""
    r = np.zeros((32, 4, 2))
    for lane in range(32):
        for m in range(4):
            row = lane // 4
            base = addr[8 * m + row]
            r[lane, m, 0] = smem[base + 2 * (lane % 4)]
            r[lane, m, 1] = smem[base + 2 * (lane % 4) + 1]
    return r


def kernel(q, k, v, bias, scale):
    """attention_tc_d{D} on q, k, v [B, L, H, D] and an optional bias [1 or B, 1 or H, Lq, Lk],
    block by block and warp by warp, after the two packing kernels."""
    B_, lq, H, D = q.shape
    lk = k.shape[1]
    lk_pad = -(-lk // BN) * BN
    kb = np.zeros((B_ * H, lk_pad, D), np.float32)
    vt = np.zeros((B_ * H, D, lk_pad), np.float32)
    for bh in range(B_ * H):
        bi, hi = divmod(bh, H)
        kb[bh, :lk] = bf16(k[bi, :, hi])
        vt[bh, :, :lk] = bf16(v[bi, :, hi]).T
    out = np.full((B_, lq, H, D), np.nan)
    KS, VS = D + 8, BN + 8
    DK, NS, ND = D // 16, BN // 8, D // 8
    l2e = 1.4426950408889634
    sl2 = np.float32(scale * l2e)
    for bh in range(B_ * H):
        bi, hi = divmod(bh, H)
        for bx in range(-(-lq // BM)):
            for warp in range(4):
                qf = np.zeros((32, DK, 8))
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    rlo = bx * BM + warp * 16 + g
                    rhi = rlo + 8

                    def pair(row, col):
                        if row >= lq:
                            return [0, 0]
                        return bf16(q[bi, row, hi, col : col + 2])

                    for kk in range(DK):
                        c = kk * 16 + 2 * t
                        qf[lane, kk, 0:2] = pair(rlo, c)
                        qf[lane, kk, 2:4] = pair(rhi, c)
                        qf[lane, kk, 4:6] = pair(rlo, c + 8)
                        qf[lane, kk, 6:8] = pair(rhi, c + 8)
                o = np.zeros((32, ND, 4))
                m_lo = np.full(32, -np.inf)
                m_hi = np.full(32, -np.inf)
                l_lo = np.zeros(32)
                l_hi = np.zeros(32)
                lanes = np.arange(32)
                lr = (lanes & 7) + ((lanes >> 4) << 3)
                lc = ((lanes >> 3) & 1) * 8
                for j0 in range(0, lk, BN):
                    ks = np.zeros(BN * KS)
                    vs = np.zeros(D * VS)
                    for r in range(BN):
                        ks[r * KS : r * KS + D] = kb[bh, j0 + r]
                    for r in range(D):
                        vs[r * VS : r * VS + BN] = vt[bh, r, j0 : j0 + BN]
                    s = np.zeros((32, NS, 4))
                    for kk in range(DK):
                        for n in range(0, NS, 2):
                            b = ldmatrix_x4(ks, (n * 8 + lr) * KS + kk * 16 + lc)
                            mma(s[:, n], qf[:, kk], np.concatenate([b[:, 0], b[:, 1]], 1))
                            mma(s[:, n + 1], qf[:, kk], np.concatenate([b[:, 2], b[:, 3]], 1))
                    mx_lo = m_lo.copy()
                    mx_hi = m_hi.copy()
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        rlo = bx * BM + warp * 16 + g
                        for n in range(NS):
                            for e in range(4):
                                key = j0 + n * 8 + 2 * t + (e & 1)
                                row = rlo if e < 2 else rlo + 8
                                x = np.float32(s[lane, n, e]) * sl2
                                if key >= lk:
                                    x = -np.inf
                                elif bias is not None and row < lq:
                                    x += (
                                        bias[
                                            bi if bias.shape[0] > 1 else 0,
                                            hi if bias.shape[1] > 1 else 0,
                                            row,
                                            key,
                                        ]
                                        * l2e
                                    )
                                s[lane, n, e] = x
                            mx_lo[lane] = max(mx_lo[lane], s[lane, n, 0], s[lane, n, 1])
                            mx_hi[lane] = max(mx_hi[lane], s[lane, n, 2], s[lane, n, 3])
                    # quad reduction (xor 1, 2)
                    mx_lo = np.array([mx_lo[(ln & ~3) : (ln & ~3) + 4].max() for ln in range(32)])
                    mx_hi = np.array([mx_hi[(ln & ~3) : (ln & ~3) + 4].max() for ln in range(32)])
                    ref_lo = np.where(mx_lo == -np.inf, 0, mx_lo)
                    ref_hi = np.where(mx_hi == -np.inf, 0, mx_hi)
                    corr_lo = np.exp2(m_lo - ref_lo)
                    corr_hi = np.exp2(m_hi - ref_hi)
                    m_lo, m_hi = mx_lo, mx_hi
                    s[:, :, 0:2] = np.exp2(s[:, :, 0:2] - ref_lo[:, None, None])
                    s[:, :, 2:4] = np.exp2(s[:, :, 2:4] - ref_hi[:, None, None])
                    l_lo = l_lo * corr_lo + s[:, :, 0:2].sum((1, 2))
                    l_hi = l_hi * corr_hi + s[:, :, 2:4].sum((1, 2))
                    o[:, :, 0:2] *= corr_lo[:, None, None]
                    o[:, :, 2:4] *= corr_hi[:, None, None]
                    for kk in range(BN // 16):
                        a = np.concatenate(
                            [
                                bf16(s[:, 2 * kk, 0:2]),
                                bf16(s[:, 2 * kk, 2:4]),
                                bf16(s[:, 2 * kk + 1, 0:2]),
                                bf16(s[:, 2 * kk + 1, 2:4]),
                            ],
                            1,
                        )
                        for n in range(0, ND, 2):
                            b = ldmatrix_x4(vs, (n * 8 + lr) * VS + kk * 16 + lc)
                            mma(o[:, n], a, np.concatenate([b[:, 0], b[:, 1]], 1))
                            mma(o[:, n + 1], a, np.concatenate([b[:, 2], b[:, 3]], 1))
                l_lo = np.array([l_lo[(ln & ~3) : (ln & ~3) + 4].sum() for ln in range(32)])
                l_hi = np.array([l_hi[(ln & ~3) : (ln & ~3) + 4].sum() for ln in range(32)])
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    rlo = bx * BM + warp * 16 + g
                    rhi = rlo + 8
                    for n in range(ND):
                        col = n * 8 + 2 * t
                        if rlo < lq:
                            out[bi, rlo, hi, col : col + 2] = o[lane, n, 0:2] / l_lo[lane]
                        if rhi < lq:
                            out[bi, rhi, hi, col : col + 2] = o[lane, n, 2:4] / l_hi[lane]
    return out


def reference(q, k, v, bias, scale):
    """Softmax attention in float64."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    s = np.einsum("blhd,bkhd->bhlk", q, k) * scale
    if bias is not None:
        s = s + bias
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhlk,bkhd->blhd", p, v)


def main():
    rng = np.random.default_rng(0)
    limit = 1e-2 if ROUND else 1e-6
    bad = 0
    cases = [
        (1, 70, 130, 1, 16, True),
        (2, 17, 65, 2, 32, False),
        (1, 65, 64, 1, 64, False),
        (1, 20, 70, 1, 128, True),
    ]
    for b, lq, lk, h, d, with_bias in cases:
        q, k, v = (rng.uniform(-1.5, 1.5, (b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
        bias = None
        if with_bias:
            bias = rng.uniform(-0.6, 0.6, (1, h, lq, lk)).astype(np.float32)
            bias[..., 3::7] = -np.inf
        scale = 1 / np.sqrt(d)
        got = kernel(q, k, v, bias, scale)
        want = reference(q, k, v, bias, scale)
        err = np.sqrt(((got - want) ** 2).sum() / (want**2).sum())
        ok = err < limit and not np.isnan(got).any()
        bad += not ok
        print(
            f"b={b} lq={lq} lk={lk} h={h} d={d} bias={with_bias}: rel_l2 {err:.2e} "
            f"{'ok' if ok else 'FAIL'}"
        )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
