"""The ``genflow`` command line: ``genflow demo``."""
import argparse
import sys
import time

import torch

__all__ = ["main"]

DEMO_SOLVERS = (("euler", 50), ("heun", 25), ("ddim", 50), ("dpmpp_2m", 10), ("dpmpp_2m", 20),
                ("dpmpp_3m", 10), ("unipc", 10), ("rk45", None), ("euler_maruyama", 200), ("ddpm", 200),
                ("dpmpp_2m_sde", 50), ("sde_adaptive", None))


def _demo(args) -> int:
    import genflow as gf
    from genflow.metrics import mmd

    processes = {"vp": gf.VP(), "edm": gf.EDM(), "linear": gf.LinearPath(), "cosine": gf.CosineVP()}
    process = processes[args.process]
    mixture = gf.GaussianMixture.ring(k=8, radius=4.0, std=0.5)
    model = mixture.model(process)
    data = mixture.sample(args.n, generator=torch.Generator().manual_seed(1))
    reference = mmd(data, mixture.sample(args.n, generator=torch.Generator().manual_seed(2)))
    print(f"genflow demo: {args.n} samples of an 8-Gaussian ring under {process!r}, "
          f"fused kernels: {'C++' if gf.HAS_EXTENSION else 'not built (PyTorch reference)'}")
    header = f"{'solver':<16}{'steps':>9}{'NFE':>6}{'time (ms)':>11}{'MMD^2':>11}"
    print(header)
    print("-" * len(header))
    results = {}
    for name, steps in DEMO_SOLVERS:
        seen = []
        started = time.perf_counter()
        x = gf.sample(model, (args.n, 2), solver=name, steps=steps or 1, generator=args.seed,
                      callback=lambda info: seen.append(info["nfe"]))
        elapsed = 1e3 * (time.perf_counter() - started)
        score = mmd(x, data)
        label = "adaptive" if steps is None else str(steps)
        results[f"{name} ({label})"] = x
        print(f"{name:<16}{label:>9}{seen[-1]:>6}{elapsed:>11.1f}{score:>11.5f}")
    print(f"{'data vs data':<42}{reference:>11.5f}")
    if args.out:
        _plot(data, results, args.out)
        print(f"saved {args.out}")
    return 0


def _plot(data, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("data", data)] + list(results.items())
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(3 * ((len(panels) + 1) // 2), 6))
    for ax, (title, pts) in zip(axes.flat, panels):
        pts = pts.detach().cpu().float()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-7, 7)
        ax.set_ylim(-7, 7)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="genflow", description="genflow: fast diffusion and flow samplers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample a 2D Gaussian mixture with several solvers and compare them")
    demo.add_argument("--n", type=int, default=2000, help="samples per solver (default 2000)")
    demo.add_argument("--process", choices=("vp", "edm", "linear", "cosine"), default="vp")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="genflow_demo.png", help="PNG of the samples ('' to skip)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.n < 2:
            parser.error("--n must be >= 2")
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
