"""Kernel SD flow vs MMD flow (with and without noise injection) vs SVGD on 2-D point sets.

Two problems from Weber, "The Score-Difference Flow for Implicit Generative Modeling": 8 Gaussians -> swiss roll, and a question mark (an arc, a stem and
a dot) -> swiss roll. Every method runs on the engine ``genflow.ops.kernel_weighted_mean``;
SVGD's target score is the exact score of a mixture of small Gaussians (std ``SVGD_KDE``)
centred on the target samples, ``(D_x(y) - y) / s^2``, one kernel mean. Saves a PNG grid of
snapshots (rows: methods; columns: snapshots per problem, the target in grey) and prints the
unbiased MMD^2 (``genflow.metrics.mmd``) of each result to a fresh target draw next to the
MMD^2 of independent target draws to it (the data-vs-data spread: nothing can do much better).

    python bench/sd_flow_figure.py [out.png] [--quick] [--n 1000] [--seed 0]
"""
import argparse
import math
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from genflow.kernel_flows import mmd_flow, svgd  # noqa: E402
from genflow.metrics import mmd  # noqa: E402
from genflow.mixtures import GaussianMixture  # noqa: E402
from genflow.ops.kernel_mean import kernel_weighted_mean  # noqa: E402
from genflow.sdflow import sd_flow, sigma_sequence  # noqa: E402

F64 = torch.float64
SVGD_KDE = 0.2  # std of the Gaussians centred on the target samples (SVGD's target density)


def swiss_roll(n, g):
    """2-D swiss roll ``t (cos t, sin t) / 3``, t in [1.5 pi, 4.5 pi], plus N(0, 0.1^2) noise."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=F64))
    return torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 3 + 0.1 * torch.randn(n, 2, generator=g, dtype=F64)


def question_mark(n, g):
    """A question mark: a 270-degree arc (70% of the points), a stem (15%) and a dot (15%)."""
    n_arc, n_stem = int(0.7 * n), int(0.15 * n)
    n_dot = n - n_arc - n_stem
    theta = -0.5 * math.pi + 1.5 * math.pi * torch.rand(n_arc, generator=g, dtype=F64)
    arc = torch.stack([1.5 * torch.cos(theta), 1.5 + 1.5 * torch.sin(theta)], 1)
    stem = torch.stack([torch.zeros(n_stem, dtype=F64), -torch.rand(n_stem, generator=g, dtype=F64)], 1)
    dot = torch.tensor([0.0, -2.0], dtype=F64) + 0.15 * torch.randn(n_dot, 2, generator=g, dtype=F64)
    points = torch.cat([arc, stem, dot])[torch.randperm(n, generator=g)]
    return 1.4 * (points + 0.08 * torch.randn(n, 2, generator=g, dtype=F64))


def eight_gaussians(n, g):
    return GaussianMixture.ring(8, 4.0, 0.5).sample(n, generator=g, dtype=F64)


def methods(steps):
    """name -> (function(source, target) -> trajectory [steps + 1, N, 2], steps)."""
    sd_steps, mmd_steps, svgd_steps = steps, 3 * steps, 3 * steps
    sigmas = sigma_sequence("cosine", sigma=2.0, sigma_min=0.1, steps=sd_steps)

    def sd(source, target):
        return sd_flow(source, target, sigma=2.0, sigma_min=0.1, sigma_schedule="cosine", steps=sd_steps,
                       step_size=[0.5 * s * s for s in sigmas], generator=1, return_trajectory=True)[1]

    def mmd_plain(source, target):
        return mmd_flow(source, target, sigma=0.5, steps=mmd_steps, step_size=3.0, generator=1,
                        return_trajectory=True)[1]

    def mmd_noisy(source, target):
        betas = [0.5 * (1 - k / mmd_steps) for k in range(mmd_steps)]  # noise level decreasing to 0
        return mmd_flow(source, target, sigma=0.5, steps=mmd_steps, step_size=3.0, noise_level=betas, generator=1,
                        return_trajectory=True)[1]

    def stein(source, target):
        def score(y):  # exact score of (1/M) sum_j N(x_j, SVGD_KDE^2 I)
            return (kernel_weighted_mean(y, target, sigma=SVGD_KDE) - y) / SVGD_KDE ** 2
        return svgd(source, score, steps=svgd_steps, step_size=0.5, generator=1, return_trajectory=True)[1]

    return {"SD flow": (sd, sd_steps), "MMD flow": (mmd_plain, mmd_steps),
            "MMD flow + noise": (mmd_noisy, mmd_steps), "SVGD": (stein, svgd_steps)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("out", nargs="?", default=os.path.join(here, "sd_flow.png"), help="PNG path")
    parser.add_argument("--quick", action="store_true", help="200 points, 10 SD-flow steps (for tests)")
    parser.add_argument("--n", type=int, default=None, help="particles = target samples (default 1000)")
    parser.add_argument("--steps", type=int, default=None, help="SD-flow steps (MMD flow, SVGD: 3x; default 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = args.n or (200 if args.quick else 1000)
    steps = args.steps or (10 if args.quick else 100)
    g = torch.Generator().manual_seed(args.seed)
    problems = {"8 Gaussians -> swiss roll": eight_gaussians, "question mark -> swiss roll": question_mark}
    runs = methods(steps)
    snapshots = (0.0, 0.1, 0.3, 1.0)

    fig, axes = plt.subplots(len(runs), len(problems) * len(snapshots),
                             figsize=(2.2 * len(problems) * len(snapshots), 2.3 * len(runs)), squeeze=False)
    rows = []
    for p, (problem, source_law) in enumerate(problems.items()):
        source, target = source_law(n, g), swiss_roll(n, g)
        fresh = swiss_roll(n, g)  # the MMD reference: independent of everything the methods see
        spread = [mmd(target, fresh)] + [mmd(swiss_roll(n, g), fresh) for _ in range(2)]
        rows.append((problem, "data vs data", max(abs(v) for v in spread), 0.0))
        rows.append((problem, "source", mmd(source, fresh), 0.0))
        for r, (name, (run, total)) in enumerate(runs.items()):
            start = time.perf_counter()
            traj = run(source, target)
            seconds = time.perf_counter() - start
            rows.append((problem, name, mmd(traj[-1], fresh), seconds))
            for c, frac in enumerate(snapshots):
                k = round(frac * total)
                ax = axes[r, p * len(snapshots) + c]
                ax.scatter(target[:, 0], target[:, 1], s=1, c="0.8", rasterized=True)
                ax.scatter(traj[k, :, 0], traj[k, :, 1], s=1, c=f"C{r}", rasterized=True)
                ax.set(xlim=(-5.5, 5.5), ylim=(-5.5, 5.5), xticks=[], yticks=[], aspect="equal")
                ax.set_title(f"{name}, step {k}" if c else f"{problem}\n{name}, step 0", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"n = {n} particles and target samples; SD flow {steps} steps, MMD flow and SVGD {3 * steps}; "
          f"MMD^2 to a fresh target draw (bandwidths 0.2 .. 5)")
    print(f"{'problem':30s} {'method':18s} {'MMD^2':>10s} {'seconds':>8s}")
    for problem, name, value, seconds in rows:
        note = "  (max |MMD^2| of 3 independent target draws)" if name == "data vs data" else ""
        print(f"{problem:30s} {name:18s} {value:10.5f} {seconds:8.2f}{note}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
