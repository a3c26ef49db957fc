"""gf.compat.diffusers vs diffusers 0.42: the standard sampling loop, scheduler by scheduler.

Each case times ``set_timesteps(20)`` then, for every timestep, ``scale_model_input``, a
near-free model (a fixed output tensor) and ``step``, the loop a diffusers pipeline runs. Both
sides start from the same sample and see the same model output, so the timings compare scheduler
overhead and update cost alone. Run as a script:

    OMP_NUM_THREADS=1 python bench/cases_diffusers.py [--sizes 1x4x8x8,4x4x64x64] [--only DDIM,UniPC]
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time

import torch

SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
SIZES = ((1, 4, 8, 8), (4, 4, 64, 64), (16, 4, 128, 128))
STEPS = 20


def _loop(scheduler, x_T: torch.Tensor, model_output: torch.Tensor, seed: int = 0):
    """The pipeline loop: ``set_timesteps``, then ``scale_model_input`` / model / ``step``."""
    generator = torch.Generator()
    options = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scale = getattr(scheduler, "scale_model_input", None)  # diffusers' flow-matching Euler has none

    def run():
        generator.manual_seed(seed)
        scheduler.set_timesteps(STEPS)
        x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            if scale is not None:
                scale(x, t)
            x = scheduler.step(model_output, t, x, return_dict=False, **options)[0]
        return x
    return run


def interleaved_best_ms(fn_a, fn_b, repeats: int, rounds: int):
    """Milliseconds per call of ``fn_a`` and ``fn_b``: the best of ``rounds`` alternating rounds of
    ``repeats`` calls each (alternating keeps a changing machine load from favouring one side)."""
    fn_a(), fn_b()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for k, fn in enumerate((fn_a, fn_b)):
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            best[k] = min(best[k], (time.perf_counter() - start) / repeats)
    return 1e3 * best[0], 1e3 * best[1]


def rows(sizes=SIZES, names=SCHEDULERS, repeats=None, rounds=5):
    """One row per scheduler and size: ``dict(name, size, genflow_ms, diffusers_ms, ratio)``
    (``ratio = diffusers_ms / genflow_ms``: above 1 is genflow faster) and ``max_abs_diff``
    between the two loops' results."""
    import diffusers

    import genflow.compat.diffusers as gcd

    out = []
    for shape in sizes:
        numel = 1
        for d in shape:
            numel *= d
        reps = repeats or max(2, min(50, int(2e6 // (numel * STEPS) + 2)))
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        model_output = 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(2))
        for name in names:
            ours, theirs = getattr(gcd, name)(), getattr(diffusers, name)()
            run_ours, run_theirs = _loop(ours, x_T, model_output), _loop(theirs, x_T, model_output)
            diff = float((run_ours() - run_theirs()).abs().max())
            ms_ours, ms_theirs = interleaved_best_ms(run_ours, run_theirs, reps, rounds)
            out.append(dict(name=name, size="x".join(map(str, shape)), genflow_ms=ms_ours, diffusers_ms=ms_theirs,
                            ratio=ms_theirs / ms_ours, max_abs_diff=diff))
    return out


def format_rows(table) -> str:
    lines = [f"{'scheduler':34s} {'size':>12s} {'genflow ms':>11s} {'diffusers ms':>13s} {'ratio':>6s} {'max diff':>9s}"]
    for r in table:
        lines.append(f"{r['name']:34s} {r['size']:>12s} {r['genflow_ms']:11.3f} {r['diffusers_ms']:13.3f} "
                     f"{r['ratio']:6.2f} {r['max_abs_diff']:9.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated BxCxHxW (default: all three)")
    parser.add_argument("--only", default=None, help="comma-separated scheduler names (default: all)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = SIZES if args.sizes is None else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    names = SCHEDULERS if args.only is None else [n if n.endswith("Scheduler") else n + "Scheduler"
                                                  for n in args.only.split(",")]
    print(format_rows(rows(sizes, names, args.repeats, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
