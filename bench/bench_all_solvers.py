"""One row per registered solver: a 20-step solve of a near-free model, so the time is the
solver engine's (host work, memory passes, noise), with its NFE.

    python bench/bench_all_solvers.py            # table
    python -m pytest bench/bench_all_solvers.py  # pytest-benchmark suite
"""

import pytest
import torch

import genflow as gf
from timing import best_ms
from genflow.solvers import SOLVERS

STEPS = 20
SHAPES = [(1, 2), (16, 3, 64, 64)]
MODEL = gf.Model(lambda x, t: 0.5 * x, gf.VP(), "x0")  # built once: grids and tables are cached


def solve(name, x_T):
    seen = []
    gf.sample(MODEL, x_T=x_T, solver=name, steps=STEPS, generator=0, callback=lambda info: seen.append(info["nfe"]))
    return seen[-1]



def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {STEPS} steps, VP, x0 = 0.5 x; ms per solve")
    print(f"{'solver':<18}{'NFE':>6}" + "".join(f"{str(s):>20}" for s in SHAPES))
    inputs = [torch.randn(s, generator=torch.Generator().manual_seed(0)) for s in SHAPES]
    for name in SOLVERS:
        nfe = solve(name, inputs[0])
        times = [best_ms(lambda: solve(name, x), 20 if x.numel() < 10 else 3) for x in inputs]
        print(f"{name:<18}{nfe:>6}" + "".join(f"{t:>20.3f}" for t in times))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver(benchmark, name):
    benchmark(solve, name, torch.randn(16, 3, 64, 64))


if __name__ == "__main__":
    main()
