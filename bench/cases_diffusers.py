"""gf.compat.diffusers vs diffusers 0.42: the standard sampling loop, scheduler by scheduler.

Each case times ``set_timesteps(20)`` then, for every timestep, ``scale_model_input``, a
near-free model (a fixed output tensor) and ``step``, the loop a diffusers pipeline runs. Both
sides start from the same sample and see the same model output, so the timings compare scheduler
overhead and update cost alone. Times and ratios are medians over interleaved rounds. Run as a
script:

    OMP_NUM_THREADS=1 python -m bench.cases_diffusers [--sizes 1x4x8x8,4x4x64x64] [--only DDIM,UniPC]
"""
from __future__ import annotations

import argparse
import inspect
import statistics
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


def interleaved_ms(fn_a, fn_b, repeats: int, rounds: int):
    """``(ms_a, ms_b, ratio)``: the median milliseconds per call of ``fn_a`` and ``fn_b`` over
    ``rounds`` alternating rounds of ``repeats`` calls each, and the median of the rounds' ratios
    ``ms_b / ms_a``. The times are the process's CPU time (``time.process_time``; run with one
    thread), which a loaded machine inflates less than wall time; alternating, and taking each
    ratio within one round, keeps a changing load from favouring one side."""
    fn_a(), fn_b()  # warm-up
    times = ([], [])
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for k in order:
            fn = (fn_a, fn_b)[k]
            start = time.process_time()
            for _ in range(repeats):
                fn()
            times[k].append(1e3 * (time.process_time() - start) / repeats)
    ratios = [b / a for a, b in zip(*times)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def rows(sizes=SIZES, names=SCHEDULERS, repeats=None, rounds=7, report=None):
    """One row per scheduler and size: ``dict(name, size, genflow_ms, diffusers_ms, ratio)`` (medians
    over ``rounds`` interleaved rounds, see ``interleaved_ms``; ``ratio = diffusers_ms / genflow_ms``:
    above 1 is genflow faster) and ``max_abs_diff`` between the two loops' results; ``report(row)``
    is called as each row is done."""
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
            ms_ours, ms_theirs, ratio = interleaved_ms(run_ours, run_theirs, reps, rounds)
            out.append(dict(name=name, size="x".join(map(str, shape)), genflow_ms=ms_ours, diffusers_ms=ms_theirs,
                            ratio=ratio, max_abs_diff=diff))
            if report is not None:
                report(out[-1])
    return out


HEADER = f"{'scheduler':34s} {'size':>12s} {'genflow ms':>11s} {'diffusers ms':>13s} {'ratio':>6s} {'max diff':>9s}"


def format_row(r) -> str:
    return (f"{r['name']:34s} {r['size']:>12s} {r['genflow_ms']:11.3f} {r['diffusers_ms']:13.3f} "
            f"{r['ratio']:6.2f} {r['max_abs_diff']:9.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated BxCxHxW (default: all three)")
    parser.add_argument("--only", default=None, help="comma-separated scheduler names (default: all)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    sizes = SIZES if args.sizes is None else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    names = SCHEDULERS if args.only is None else [n if n.endswith("Scheduler") else n + "Scheduler"
                                                  for n in args.only.split(",")]
    print(HEADER, flush=True)
    rows(sizes, names, args.repeats, args.rounds, report=lambda row: print(format_row(row), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
