"""Full 20-step DPM-Solver++(2M) solves: genflow vs k-diffusion vs diffusers, side by side.

The model is near-free (``x0 = 0.5 x``) so the numbers measure the solver engines: per-step host
work, allocation and memory passes. genflow and k-diffusion integrate the same EDM problem on
the same Karras grid (their results agree to float rounding); diffusers runs its standard
``DPMSolverMultistepScheduler`` loop (``set_timesteps`` / ``step``) with 20 steps.

    python bench/bench_solvers.py              # table of ms per solve and speed ratios
    python -m pytest bench/bench_solvers.py    # pytest-benchmark suite
"""
import pytest
import torch

import genflow as gf
from genflow.peers import k_diffusion_sampling
from timing import best_ms

SHAPES = [(1, 2), (65536, 2), (16, 3, 64, 64), (64, 3, 128, 128)]
STEPS = 20


def _karras_sigmas():
    return gf.time_grid(gf.EDM(), STEPS, "karras")


MODEL = gf.Model(lambda x, t: 0.5 * x, gf.EDM(), "x0")  # built once, like the peers' sigmas


def genflow_solve(x_T):
    return gf.sample(MODEL, x_T=x_T, solver="dpmpp_2m", steps=STEPS, schedule="karras")


def k_diffusion_solve(x_T, sigmas):
    """``sigmas``: the same Karras grid as genflow's, ending at sigma_min (built once, outside)."""
    return k_diffusion_sampling().sample_dpmpp_2m(lambda x, sigma: 0.5 * x, x_T, sigmas, disable=True)


def diffusers_solve(x_T, scheduler):
    scheduler.set_timesteps(STEPS)
    x = x_T
    for t in scheduler.timesteps:
        eps = 0.5 * scheduler.scale_model_input(x, t)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x


def _diffusers_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)



def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 20-step DPM-Solver++(2M), ms per solve")
    print(f"{'shape':<20}{'elements':>10}{'genflow':>10}{'k-diff':>10}{'diffusers':>11}{'k-diff/gf':>11}{'diff/gf':>9}")
    scheduler = _diffusers_scheduler()
    sigmas = _karras_sigmas().float()
    for shape in SHAPES:
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 80.0
        numel = x_T.numel()
        repeats = max(1, min(200, int(2e7 / max(numel * STEPS, 1))))
        g = best_ms(lambda: genflow_solve(x_T), repeats)
        k = best_ms(lambda: k_diffusion_solve(x_T, sigmas), repeats)
        d = best_ms(lambda: diffusers_solve(x_T, scheduler), repeats)
        print(f"{str(shape):<20}{numel:>10}{g:>10.3f}{k:>10.3f}{d:>11.3f}{k / g:>11.2f}{d / g:>9.2f}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("engine", ["genflow", "k_diffusion", "diffusers"])
def test_dpmpp_2m_solve(benchmark, engine, shape):
    x_T = torch.randn(shape) * 80.0
    if engine == "genflow":
        benchmark(genflow_solve, x_T)
    elif engine == "k_diffusion":
        benchmark(k_diffusion_solve, x_T, _karras_sigmas().float())
    else:
        benchmark(diffusers_solve, x_T, _diffusers_scheduler())


if __name__ == "__main__":
    main()
