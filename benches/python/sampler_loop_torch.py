#!/usr/bin/env python3
"""The loop of `flux bench sampler`, written in PyTorch eager: the baseline it is compared with.

Same work as the Rust command: the flux-dev model sampling (shift 1.15, a 10000-entry float32
sigma table), scheduler `simple`, a start latent of `torch.randn(shape, generator=seed)` (sigma 0
is 1, so the latent is the noise itself), the analytic Gaussian-mixture denoiser of
`flux_samplers::toy::MixtureDenoiser::reference(cfg=1, flow=True)` (evaluated in float64, as the
Rust denoiser does, and rounded back to the latent's dtype), and the sampler updates as
k-diffusion/ComfyUI write them (`sample_euler`, `sample_dpmpp_2m`, `sample_dpmpp_2m_sde` with
ComfyUI's Brownian-tree noise from torchsde, `sample_euler_ancestral` in its rectified-flow form).

Prints one line in the Rust command's format:
`sampler=NAME shape=B,C,H,W steps=N total_s=<median of 5 after a warm-up>
overhead_per_step_s=<median of (total - time inside the denoiser) / steps>`.

    python sampler_loop_torch.py --sampler dpmpp_2m --steps 20 --shape 1,16,128,128 --threads 2
"""

import argparse
import math
import statistics
import sys
import time

import torch

# --- model sampling and schedule (ComfyUI's ModelSamplingFlux and simple_scheduler) -------------


def flux_time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


class FluxSampling:
    """ComfyUI's `ModelSamplingFlux` for a given shift."""

    def __init__(self, shift):
        self.shift = shift
        ts = torch.arange(1, 10001, 1) / 10000
        self.sigmas = flux_time_shift(shift, 1.0, ts).float()

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return flux_time_shift(self.shift, 1.0, 1.0 - percent)


def simple_scheduler(ms, steps):
    sigs = []
    ss = len(ms.sigmas) / steps
    for x in range(steps):
        sigs += [float(ms.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


# --- the analytic denoiser ----------------------------------------------------------------------

COND = ((0.3, -1.0, 0.25), (0.7, 0.8, 0.5))  # (weight, mean, std) per mixture component


class MixtureDenoiser:
    """`E[x0 | (1 - sigma) x0 + sigma eps = x]` for x0 from the reference data's conditional
    mixture; adds up the time spent inside it."""

    def __init__(self, compute_dtype):
        self.compute_dtype = compute_dtype
        self.spent = 0.0

    def __call__(self, x, sigma):
        t0 = time.perf_counter()
        sigma = float(sigma[0])
        a = 1.0 - sigma
        xd = x.to(self.compute_dtype)
        logits, means = [], []
        for w, mu, s in COND:
            s2 = s * s
            v = a * a * s2 + sigma * sigma
            r = xd - a * mu
            logits.append(math.log(w) - 0.5 * math.log(v) - 0.5 * (r * r) / v)
            means.append(mu + (a * s2 / v) * r)
        m = torch.maximum(logits[0], logits[1])
        e0 = torch.exp(logits[0] - m)
        e1 = torch.exp(logits[1] - m)
        out = ((e0 * means[0] + e1 * means[1]) / (e0 + e1)).to(x.dtype)
        self.spent += time.perf_counter() - t0
        return out


# --- samplers (as k-diffusion / ComfyUI write them) ---------------------------------------------


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(model, x, sigmas, ms):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, ms, eta=1.0, s_noise=1.0, seed=0):
    # The rectified-flow branch ComfyUI takes for Flux (`sample_euler_ancestral_RF`), with its
    # default noise sampler (a CPU generator seeded seed + 1).
    gen = torch.Generator().manual_seed(seed + 1)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1 = 1 - sigmas[i + 1]
            alpha_down = 1 - sigma_down
            renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
            if eta > 0:
                noise = torch.randn(x.shape, dtype=x.dtype, generator=gen)
                x = (alpha_ip1 / alpha_down) * x + noise * s_noise * renoise_coeff
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, ms):
    s_in = x.new_ones([x.shape[0]])

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


class BrownianTreeNoiseSampler:
    """ComfyUI's Brownian-tree noise (cpu=True): torchsde's BrownianTree with entropy `seed`."""

    def __init__(self, x, sigma_min, sigma_max, seed):
        import torchsde  # only this sampler needs it

        self.tree = torchsde.BrownianTree(
            sigma_min, torch.zeros_like(x), sigma_max, entropy=seed
        )

    def __call__(self, sigma, sigma_next):
        if sigma > sigma_next:
            w = -self.tree(sigma_next, sigma)
        else:
            w = self.tree(sigma, sigma_next)
        return w / (sigma_next - sigma).abs().sqrt()


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, ms, eta=1.0, s_noise=1.0, seed=0):
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    noise_sampler = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed)
    s_in = x.new_ones([x.shape[0]])
    # ComfyUI's offset_first_sigma_for_snr and half-logSNR for a flow model.
    sigmas = sigmas.clone()
    if sigmas[0] >= 1:
        sigmas[0] = ms.percent_to_sigma(1e-4)

    def lambda_fn(sigma):
        return sigma.logit().neg()

    old_denoised = None
    h, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (
                -h_eta
            ).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (
                    denoised - old_denoised
                )
            if eta > 0 and s_noise > 0:
                x = (
                    x
                    + noise_sampler(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * h * eta).expm1().neg().sqrt()
                    * s_noise
                )
        old_denoised = denoised
        h_last = h
    return x


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}

# --- measurement --------------------------------------------------------------------------------


def parse_shape(s):
    try:
        dims = [int(d) for d in s.split(",")]
    except ValueError:
        sys.exit(f"--shape '{s}': expected comma-separated sizes such as 1,16,128,128")
    if not dims or any(d < 1 for d in dims):
        sys.exit(f"--shape '{s}': every size must be at least 1")
    return dims


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sampler", required=True, choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--shape", default="1,16,128,128")
    p.add_argument("--dtype", choices=["f32", "f64"], default="f32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--denoiser-dtype",
        choices=["f64", "f32"],
        default="f64",
        help="precision of the analytic denoiser (the Rust one computes in f64)",
    )
    args = p.parse_args()
    if args.steps < 1:
        sys.exit("--steps must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            sys.exit("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    shape = parse_shape(args.shape)
    dtype = torch.float32 if args.dtype == "f32" else torch.float64
    compute = torch.float64 if args.denoiser_dtype == "f64" else torch.float32

    ms = FluxSampling(1.15)
    sigmas = simple_scheduler(ms, args.steps)
    noise = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(args.seed))
    sampler = SAMPLERS[args.sampler]
    kwargs = {"seed": args.seed} if args.sampler in ("dpmpp_2m_sde", "euler_ancestral") else {}

    def run_once():
        model = MixtureDenoiser(compute)
        t0 = time.perf_counter()
        x = noise.clone()
        out = sampler(model, x, sigmas, ms, **kwargs)
        total = time.perf_counter() - t0
        float(out.abs().max())  # keep the result observable
        return total, model.spent

    run_once()
    totals, overheads = [], []
    for _ in range(5):
        total, inside = run_once()
        totals.append(total)
        overheads.append(max(total - inside, 0.0) / args.steps)
    print(
        f"sampler={args.sampler} shape={','.join(map(str, shape))} steps={args.steps} "
        f"total_s={statistics.median(totals):.6e} "
        f"overhead_per_step_s={statistics.median(overheads):.6e}"
    )


if __name__ == "__main__":
    main()
