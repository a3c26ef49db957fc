"""gf.compat.k_diffusion vs k-diffusion 0.1.1.post1: every sampler, side by side in one process.

Each case runs the sampler with its default options on k-diffusion's 20-step Karras sigmas
(``sample_dpm_fast``: 20 NFE; ``sample_dpm_adaptive``: its default tolerances between the same
sigma_min and sigma_max) with a near-free denoiser (``0.5 x``), so the timings compare the
samplers' own cost; the SDE samplers whose default noise is torchsde's Brownian tree (which
then dominates both sides) get a ``randn_like`` noise_sampler on both sides. Both sides start from the same x under the same torch seed (the same noise);
``max_abs_diff`` is the difference of their results. Times and ratios are medians of interleaved
rounds in process CPU time (``cases_diffusers.interleaved_ms``). Run as a module or a script:

    OMP_NUM_THREADS=1 python -m bench.cases_k_diffusion [--sizes 1x2,48000x64] [--only euler,dpmpp_2m]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases_diffusers import interleaved_ms  # noqa: E402

SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive",
            "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")
SIZES = ((1, 2), (48000, 64))  # batch 1 and 3.07M elements
STEPS = 20
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def near_free(x, sigma):
    return 0.5 * x


BROWNIAN_DEFAULT = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")


def _call(module, name, x, sigmas):
    sampler = getattr(module, f"sample_{name}")
    if name in BROWNIAN_DEFAULT:  # a randn_like noise_sampler on both sides instead of torchsde's tree
        return lambda: sampler(near_free, x, sigmas, disable=True, noise_sampler=lambda s, s_next: torch.randn_like(x))
    if name == "dpm_fast":
        return lambda: sampler(near_free, x, SIGMA_MIN, SIGMA_MAX, STEPS, disable=True)
    if name == "dpm_adaptive":
        return lambda: sampler(near_free, x, SIGMA_MIN, SIGMA_MAX, disable=True)
    return lambda: sampler(near_free, x, sigmas, disable=True)


def _seeded(fn, seed=0):
    def run():
        torch.manual_seed(seed)
        return fn()
    return run


def rows(sizes=SIZES, names=SAMPLERS, repeats=None, rounds=7, report=None):
    """One row per sampler and size: ``dict(name, size, genflow_ms, peer_ms, ratio, max_abs_diff)``
    (``ratio = peer_ms / genflow_ms``: above 1 is genflow faster); times and ratio are medians over
    ``rounds`` interleaved rounds (``cases_diffusers.interleaved_ms``); ``report(row)`` is called as
    each row is done."""
    from genflow import peers
    from genflow.compat import k_diffusion as ours

    theirs = peers.k_diffusion_sampling()
    if theirs is None:
        raise RuntimeError(f"k-diffusion is not installed ({peers.K_DIFFUSION_INSTALL})")
    sigmas = theirs.get_sigmas_karras(STEPS, SIGMA_MIN, SIGMA_MAX)
    out = []
    for shape in sizes:
        numel = 1
        for d in shape:
            numel *= d
        reps = repeats or max(2, min(20, int(4e6 // (numel * STEPS) + 2)))
        x = SIGMA_MAX * torch.randn(shape, generator=torch.Generator().manual_seed(1))
        for name in names:
            run_ours, run_theirs = _seeded(_call(ours, name, x, sigmas)), _seeded(_call(theirs, name, x, sigmas))
            diff = float((run_ours() - run_theirs()).abs().max())
            ms_ours, ms_theirs, ratio = interleaved_ms(run_ours, run_theirs, reps, rounds)
            out.append(dict(name=name, size="x".join(map(str, shape)), genflow_ms=ms_ours, peer_ms=ms_theirs,
                            ratio=ratio, max_abs_diff=diff))
            if report is not None:
                report(out[-1])
    return out


HEADER = f"{'sampler':20s} {'size':>9s} {'genflow ms':>11s} {'k-diffusion ms':>15s} {'ratio':>6s} {'max diff':>9s}"


def format_row(r) -> str:
    return (f"{r['name']:20s} {r['size']:>9s} {r['genflow_ms']:11.3f} {r['peer_ms']:15.3f} {r['ratio']:6.2f} "
            f"{r['max_abs_diff']:9.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated shapes, e.g. 1x2,48000x64 (default: both)")
    parser.add_argument("--only", default=None, help="comma-separated sampler names without sample_ (default: all)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    sizes = SIZES if args.sizes is None else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    names = SAMPLERS if args.only is None else args.only.split(",")
    with warnings.catch_warnings():  # torchsde's Brownian tree warns on queries rounded just outside its interval
        warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
        print(HEADER, flush=True)
        rows(sizes, names, args.repeats, args.rounds, report=lambda row: print(format_row(row), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
