#!/usr/bin/env python3
"""One Flux double-stream block and one single-stream block in PyTorch eager: the baseline of
`flux bench transformer --double 1 --single 1`.

The blocks follow the structure of black-forest-labs/flux (`src/flux/modules/layers.py`):
adaLN modulation from the conditioning vector, LayerNorm without affine, QKV with bias, RMS
query/key norm, 3-axis RoPE, scaled-dot-product attention over the joint text+image sequence,
tanh-GELU MLP of width 4H; the single-stream block fuses QKV and the MLP input into one linear
layer and the attention output and MLP output into another. Random weights, f32.

Prints `forward_s=<median of 3 after a warm-up> gflops=<...>` with the Rust command's formula
`2 * (double + single) * (12 H^2 L + 2 L^2 H) / forward_s / 1e9`, L = image + text tokens (the
Rust forward also runs the embedders and final layer, which the formula does not count).
With `--sgemm N` it prints torch's square sgemm rate instead: `sgemm_n=N gflops=...`.

    python transformer_block_torch.py --threads 2
    python transformer_block_torch.py --threads 2 --sgemm 2048
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def linear(gen, fan_in, fan_out, bias=True):
    bound = fan_in**-0.5
    w = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
    b = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound if bias else None
    return w, b


def modulation(vec, w, b, n):
    """`n` (shift, scale, gate) triples from the conditioning vector, each [B, 1, H]."""
    out = F.linear(F.silu(vec), w, b)[:, None, :].chunk(3 * n, dim=-1)
    return [out[3 * i : 3 * i + 3] for i in range(n)]


def rms_norm(x, scale):
    rrms = torch.rsqrt(torch.mean(x.float() ** 2, dim=-1, keepdim=True) + 1e-6)
    return (x.float() * rrms).to(x.dtype) * scale


def rope(pos, dim, theta):
    """Rotation matrices [B, L, dim/2, 2, 2] for positions `pos` [B, L] on one axis."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    omega = 1.0 / (theta**scale)
    out = pos.to(torch.float64)[..., None] * omega
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def embed_nd(ids, axes, theta=10000):
    emb = torch.cat([rope(ids[..., i], axes[i], theta) for i in range(len(axes))], dim=-3)
    return emb.unsqueeze(1)  # [B, 1, L, D/2, 2, 2]


def apply_rope(xq, xk, pe):
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = pe[..., 0] * xq_[..., 0] + pe[..., 1] * xq_[..., 1]
    xk_out = pe[..., 0] * xk_[..., 0] + pe[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    b, h, l, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, l, h * d)


def split_heads(qkv, heads):
    """[B, L, 3*H*D] -> q, k, v of [B, heads, L, D]."""
    b, l, _ = qkv.shape
    qkv = qkv.reshape(b, l, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


class DoubleStreamBlock:
    def __init__(self, gen, hidden, heads, mlp_ratio=4.0):
        self.hidden, self.heads = hidden, heads
        mlp = int(hidden * mlp_ratio)
        head_dim = hidden // heads
        self.p = {}
        for s in ("img", "txt"):
            self.p[s] = {
                "mod": linear(gen, hidden, 6 * hidden),
                "qkv": linear(gen, hidden, 3 * hidden),
                "q_norm": torch.ones(head_dim) + 0.1 * torch.rand(head_dim, generator=gen),
                "k_norm": torch.ones(head_dim) + 0.1 * torch.rand(head_dim, generator=gen),
                "proj": linear(gen, hidden, hidden),
                "mlp0": linear(gen, hidden, mlp),
                "mlp2": linear(gen, mlp, hidden),
            }

    def _pre(self, x, vec, p):
        mod1, mod2 = modulation(vec, *p["mod"], 2)
        shift, scale, _ = mod1
        xm = (1 + scale) * F.layer_norm(x, (self.hidden,), eps=1e-6) + shift
        q, k, v = split_heads(F.linear(xm, *p["qkv"]), self.heads)
        return rms_norm(q, p["q_norm"]), rms_norm(k, p["k_norm"]), v, mod1, mod2

    def _post(self, x, attn, mod1, mod2, p):
        x = x + mod1[2] * F.linear(attn, *p["proj"])
        h = (1 + mod2[1]) * F.layer_norm(x, (self.hidden,), eps=1e-6) + mod2[0]
        h = F.linear(F.gelu(F.linear(h, *p["mlp0"]), approximate="tanh"), *p["mlp2"])
        return x + mod2[2] * h

    def __call__(self, img, txt, vec, pe):
        iq, ik, iv, im1, im2 = self._pre(img, vec, self.p["img"])
        tq, tk, tv, tm1, tm2 = self._pre(txt, vec, self.p["txt"])
        q = torch.cat((tq, iq), dim=2)
        k = torch.cat((tk, ik), dim=2)
        v = torch.cat((tv, iv), dim=2)
        attn = attention(q, k, v, pe)
        lt = txt.shape[1]
        txt_attn, img_attn = attn[:, :lt], attn[:, lt:]
        img = self._post(img, img_attn, im1, im2, self.p["img"])
        txt = self._post(txt, txt_attn, tm1, tm2, self.p["txt"])
        return img, txt


class SingleStreamBlock:
    def __init__(self, gen, hidden, heads, mlp_ratio=4.0):
        self.hidden, self.heads = hidden, heads
        self.mlp = int(hidden * mlp_ratio)
        head_dim = hidden // heads
        self.mod = linear(gen, hidden, 3 * hidden)
        self.linear1 = linear(gen, hidden, 3 * hidden + self.mlp)
        self.linear2 = linear(gen, hidden + self.mlp, hidden)
        self.q_norm = torch.ones(head_dim) + 0.1 * torch.rand(head_dim, generator=gen)
        self.k_norm = torch.ones(head_dim) + 0.1 * torch.rand(head_dim, generator=gen)

    def __call__(self, x, vec, pe):
        ((shift, scale, gate),) = modulation(vec, *self.mod, 1)
        xm = (1 + scale) * F.layer_norm(x, (self.hidden,), eps=1e-6) + shift
        qkv, mlp = torch.split(F.linear(xm, *self.linear1), [3 * self.hidden, self.mlp], dim=-1)
        q, k, v = split_heads(qkv, self.heads)
        q, k = rms_norm(q, self.q_norm), rms_norm(k, self.k_norm)
        attn = attention(q, k, v, pe)
        out = F.linear(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2), *self.linear2)
        return x + gate * out


def axes_for(head_dim):
    """The released RoPE split (16/56/56 of 128), scaled for other head sizes (as the Rust bench)."""
    if head_dim == 128:
        return [16, 56, 56]
    a0 = (head_dim // 8) & ~1
    rest = head_dim - a0
    a1 = (rest // 2) & ~1
    return [a0, a1, rest - a1]


def sgemm(n, reps=5):
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    print(f"sgemm_n={n} seconds={s:.6f} gflops={2 * n**3 / s / 1e9:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--img-tokens", type=int, default=256)
    p.add_argument("--txt-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--sgemm", type=int, default=None, metavar="N", help="measure an N^3 sgemm instead")
    args = p.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            sys.exit("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.sgemm is not None:
        if args.sgemm < 1:
            sys.exit("--sgemm must be at least 1")
        sgemm(args.sgemm)
        return
    h, heads = args.hidden, args.heads
    if heads < 1 or h % heads or (h // heads) % 2:
        sys.exit(f"--hidden {h} must split into --heads {heads} of an even head dim")
    li, lt = args.img_tokens, args.txt_tokens
    gen = torch.Generator().manual_seed(7)
    double = DoubleStreamBlock(gen, h, heads)
    single = SingleStreamBlock(gen, h, heads)
    img = torch.randn(1, li, h, generator=gen)
    txt = torch.randn(1, lt, h, generator=gen)
    vec = torch.randn(1, h, generator=gen)
    side = max(1, int(-(-li**0.5 // 1)))
    img_ids = torch.tensor([[0.0, t // side, t % side] for t in range(li)])
    ids = torch.cat((torch.zeros(lt, 3), img_ids), dim=0)[None]
    pe = embed_nd(ids, axes_for(h // heads))

    def forward():
        i, t = double(img, txt, vec, pe)
        x = torch.cat((t, i), dim=1)
        return single(x, vec, pe)

    forward()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    l = li + lt
    flops = 2 * 2 * (12 * h * h * l + 2 * l * l * h)
    print(f"forward_s={s:.6f} gflops={flops / s / 1e9:.2f}")


if __name__ == "__main__":
    main()
