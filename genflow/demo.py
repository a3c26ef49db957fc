"""``genflow demo``: train two small models on a 2-D mixture, then compare solvers on them.

The data is the 8-Gaussian ring (``GaussianMixture.ring(8, radius=4, std=0.5)``), whose density
is known exactly, so sample quality is measured against the truth: MMD^2 to a fresh data sample
(``genflow.metrics.mmd``) and ``KL(samples || mixture)`` with the exact mixture log-density and
a k-nearest-neighbour entropy estimate (``genflow.metrics.kl_to_density``). Two models are
trained with genflow's Trainer (``genflow.train``):

* ``flow``: conditional flow matching on ``LinearPath`` (``x_t = (1 - t) x0 + t eps``), a
  velocity-predicting MLP (Lipman et al. 2023, eq. 23; the ``flow-matching`` family);
* ``edm``: denoising score matching on ``EDM`` (``x_t = x0 + sigma eps``), an x0 denoiser with
  Karras et al.'s (2022) preconditioning and loss weighting (Table 1; the ``diffusion`` family).

``--no-train`` replaces them by the mixture's exact denoiser under ``--process``. Each model is
sampled with a handful of solvers at several step counts from the same starting noise. Solvers
that k-diffusion also has are run through k-diffusion as well, on the same network, sigma grid
and starting noise, and both are timed (best of a few runs): k-diffusion integrates
``x / alpha(t)`` over ``sigma = sigma(t) / alpha(t)``, which for EDM is the process itself (its
denoiser is the network, unwrapped) and for VP-type processes a change of variables
(Karras et al. 2022, eq. 4 with ``s(t) = alpha(t)``). ``LinearPath`` has ``alpha(T) = 0`` (its
sigma would start at infinity), so flow models get no k-diffusion comparison.
"""
import argparse
import math
import time
from typing import NamedTuple, Optional

import torch
from torch import nn

import genflow as gf
from genflow import peers
from genflow.metrics import MMD, kl_to_density

__all__ = ["Row", "TimeMLP", "VelocityNet", "add_arguments", "resolve", "run"]

SOLVERS = ("euler", "heun", "dpmpp_2m", "unipc", "dpmpp_2m_sde", "rk45")
STEPS = (5, 10, 20, 50)
RK45_TOL = 1e-3
K_DIFFUSION = {"euler": "sample_euler", "heun": "sample_heun", "dpmpp_2m": "sample_dpmpp_2m",
               "dpmpp_2m_sde": "sample_dpmpp_2m_sde"}
SCHEDULES = {"EDM": "karras", "LinearPath": "uniform"}  # anything else: "logsnr"
PROCESSES = ("vp", "edm", "linear", "cosine")
QUICK = {"n": 256, "train_steps": 150, "steps": (5, 10), "repeats": 1}
DEFAULTS = {"n": 2000, "train_steps": 1500, "steps": STEPS, "repeats": 3}


# -- networks ---------------------------------------------------------------------------------
class TimeMLP(nn.Module):
    """``F(x, s)``: an MLP on ``[x, sin(pi f s), cos(pi f s)]``, ``f`` geometric in ``[1, 4]``.

    Args:
        dim: data dimension ``D``. width, depth: hidden layer size and count.
        frequencies: number of Fourier frequencies of the time input ``s (Tensor[B])``.
    Input ``x (Tensor[B, D])``, output Tensor[B, D].
    """

    def __init__(self, dim: int = 2, *, width: int = 64, depth: int = 3, frequencies: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.logspace(0.0, math.log10(4.0), frequencies))
        layers, size = [], dim + 2 * frequencies
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.SiLU()]
            size = width
        self.layers = nn.Sequential(*layers, nn.Linear(size, dim))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        angles = s.to(x.dtype)[:, None] * self.freqs.to(x.dtype)
        return self.layers(torch.cat([x, angles.sin(), angles.cos()], dim=1))


class VelocityNet(nn.Module):
    """Velocity ``v(x_t, t) = c_out(t) F(c_in(t) x_t, t)`` for a process and data std ``sigma_data``.

    ``c_in = (alpha^2 sigma_data^2 + sigma^2)^(-1/2)`` makes the input unit-variance and
    ``c_out = (alpha'^2 sigma_data^2 + sigma'^2)^(1/2)`` is the scale of the target
    ``alpha'(t) x0 + sigma'(t) eps`` (the preconditioning idea of Karras et al. 2022, §5).
    """

    def __init__(self, process, sigma_data: float, **mlp):
        super().__init__()
        self.process, self.sigma_data = process, sigma_data
        self.inner = TimeMLP(**mlp)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p, sd2 = self.process, self.sigma_data ** 2
        t64 = t.to(torch.float64)
        c_in = torch.rsqrt(p.alpha(t64) ** 2 * sd2 + p.sigma(t64) ** 2).to(x.dtype)[:, None]
        c_out = torch.sqrt(p.dalpha(t64) ** 2 * sd2 + p.dsigma(t64) ** 2).to(x.dtype)[:, None]
        return c_out * self.inner(c_in * x, t)


# -- training ---------------------------------------------------------------------------------
def _data_std(mixture: gf.GaussianMixture) -> float:
    """Per-coordinate standard deviation of the mixture, averaged over coordinates (RMS)."""
    w, mu = mixture.weights, mixture.means
    second = (w[:, None] * (mu ** 2 + torch.diagonal(mixture.covs, dim1=1, dim2=2))).sum(0)
    return float((second - (w @ mu) ** 2).mean().sqrt())


class _DemoModel(NamedTuple):
    name: str
    description: str
    model: gf.Model


def _trained_models(mixture, args) -> list:
    """Train the two demo families with ``genflow.train`` (fresh mixture draws every step).

    ``flow``: flow matching (``make_family("flow-matching")``) with the preconditioned
    ``VelocityNet``; ``edm``: EDM denoising score matching (``make_family("diffusion",
    process=EDM)``, Karras et al.'s preconditioning around a ``TimeMLP``) with log-normal noise
    levels centred at ``P_mean = -0.4`` rather than their -1.2: the ring's structure lives at the
    components' scale (std 0.5), not at the data std (1500 steps, seed 0: KL to the mixture 0.14
    nats for edm and 0.11 for flow at 20 heun steps)."""
    from genflow.train import TrainConfig, load_dataset, make_family, train

    sd = _data_std(mixture)
    data = load_dataset(mixture, n=4096, seed=args.seed, infinite=True, name="ring")
    with torch.random.fork_rng():  # network initialisation, without touching the caller's RNG
        torch.manual_seed(args.seed)
        families = [
            ("flow", make_family("flow-matching", data_shape=(2,), net=VelocityNet(gf.LinearPath(), sd)), 1e-2),
            ("edm", make_family("diffusion", data_shape=(2,), process=gf.EDM(sigma_data=sd), sigma_data=sd,
                                P_mean=-0.4, P_std=1.4, net=TimeMLP()), 1e-2),
        ]
    out = []
    # learning rate 1e-2 for both (with warm-up and cosine decay; EDM at 5e-3 reached KL 0.52, at 1e-2 0.14)
    for name, family, lr in families:
        config = TrainConfig(steps=args.train_steps, batch_size=1024, lr=lr, warmup=max(1, args.train_steps // 20),
                             decay="cosine", ema=None, grad_clip=None, seed=args.seed, log_every=50)
        result = train(family, data, config, progress=True)
        family.modules.requires_grad_(False)
        loss = float(result.losses["main"][-50:].mean())
        print(f"trained {name:<5} {args.train_steps} steps in {result.seconds:5.1f} s (final loss {loss:.3f})")
        model = family.model()
        out.append(_DemoModel(name, f"{type(model.process).__name__}, {model.prediction}-predicting MLP "
                                    f"(data std {sd:.2f})", model))
    return out


def _exact_models(mixture, args) -> list:
    process = {"vp": gf.VP(), "edm": gf.EDM(), "linear": gf.LinearPath(t_min=1e-3),
               "cosine": gf.CosineVP()}[args.process]
    return [_DemoModel(f"exact-{args.process}", f"{process!r}, exact x0 denoiser of the mixture",
                       mixture.model(process))]


# -- sampling ---------------------------------------------------------------------------------
class _Counted:
    """``net`` that counts its calls (the NFE), for genflow and k-diffusion alike."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, t, **cond):
        self.calls += 1
        return self.net(x, t, **cond)


class _KDenoiser:
    """``model`` as a k-diffusion denoiser ``D(x, s) = x0(alpha(t) x, t)`` with ``s = sigma(t) / alpha(t)``.

    k-diffusion's state is ``x_t / alpha(t)`` (Karras et al. 2022, eq. 4 with ``s(t) = alpha(t)``).
    """

    def __init__(self, model: gf.Model):
        self.model, self.process = model, model.process

    def __call__(self, x, s):
        t = self.process.t_from_log_snr(-torch.log(s.to(torch.float64)))
        return self.model.x0(self.process.alpha(t).to(x.dtype)[:, None] * x, t)


class Row(NamedTuple):
    """One line of the demo's table (times in ms; ``k_ms`` None where k-diffusion does not apply)."""

    model: str
    solver: str
    steps: Optional[int]
    nfe: int
    ms: float
    mmd2: float
    kl: float
    k_ms: Optional[float]


def _best_of(fn, repeats):
    best, out = math.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return out, 1e3 * best


def _quality(x, to_data, mixture):
    if not bool(torch.isfinite(x).all()):
        return math.nan, math.nan
    return to_data(x), kl_to_density(x, mixture.log_prob)


def _evaluate(entry: _DemoModel, mixture, to_data, args, k_sampling):
    """Sample ``entry`` with every solver and step count; returns the rows and the panel samples."""
    counted = _Counted(entry.model.net)
    model = gf.Model(counted, entry.model.process, prediction=entry.model.prediction)
    process = model.process
    schedule = SCHEDULES.get(type(process).__name__, "logsnr")
    x_T = process.prior_sample((args.n, 2), generator=torch.Generator().manual_seed(args.seed))
    if k_sampling is not None and float(process.alpha(process.T)) > 0:
        k_model = counted if isinstance(process, gf.EDM) and model.prediction == "x0" else _KDenoiser(model)
    else:
        k_model = None
    rows, panels = [], {}
    for solver in SOLVERS:
        adaptive = getattr(gf.solvers.get(solver), "adaptive", False)
        for steps in (None,) if adaptive else args.steps:
            options = {"rtol": RK45_TOL, "atol": RK45_TOL} if adaptive else {}
            before = counted.calls
            x, ms = _best_of(lambda: gf.sample(model, solver=solver, steps=steps or 1, schedule=schedule,
                                               x_T=x_T, generator=args.seed, **options), args.repeats)
            nfe = (counted.calls - before) // args.repeats
            k_ms = None
            if k_model is not None and solver in K_DIFFUSION:
                ts = gf.time_grid(process, steps, schedule)
                sigmas = torch.exp(-process.log_snr(ts)).to(x_T.dtype)
                _, k_ms = _best_of(lambda: _k_sample(k_sampling, solver, k_model, x_T / process.alpha(process.T),
                                                     sigmas, args.seed), args.repeats)
            rows.append(Row(entry.name, solver, steps, nfe, ms, *_quality(x, to_data, mixture), k_ms))
            if steps in (None, _panel_steps(args.steps)):
                panels[solver] = (x, steps, nfe)
    return rows, panels


def _panel_steps(steps) -> int:
    """The step count whose samples the figure shows: 10 when run, else the smallest."""
    return 10 if 10 in steps else min(steps)


def _k_sample(k_sampling, solver, denoiser, x, sigmas, seed):
    """One k-diffusion solve; the SDE solver draws its noise from a seeded generator."""
    options = {}
    if solver == "dpmpp_2m_sde":
        generator = torch.Generator().manual_seed(seed)
        options["noise_sampler"] = lambda sigma, sigma_next: torch.randn(x.shape, generator=generator)
    return getattr(k_sampling, K_DIFFUSION[solver])(denoiser, x.clone(), sigmas, disable=True, **options)


# -- report -----------------------------------------------------------------------------------
def _format_table(rows, floor) -> str:
    header = (f"{'model':<14}{'solver':<14}{'steps':>8}{'NFE':>6}{'ms':>9}{'MMD^2':>10}{'KL':>9}"
              f"{'k-diff ms':>11}{'speed-up':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        steps = "adaptive" if r.steps is None else str(r.steps)
        k_ms, speed = ("—", "—") if r.k_ms is None else (f"{r.k_ms:.1f}", f"{r.k_ms / r.ms:.2f}x")
        lines.append(f"{r.model:<14}{r.solver:<14}{steps:>8}{r.nfe:>6}{r.ms:>9.1f}{r.mmd2:>10.4f}{r.kl:>9.3f}"
                     f"{k_ms:>11}{speed:>10}")
    lines.append(f"{'data (fresh sample of the mixture)':<51}{floor[0]:>10.4f}{floor[1]:>9.3f}")
    return "\n".join(lines)


def _plot(path, mixture, data, models, results, floor, steps_shown):
    """Per model: a row of sample panels (data first), then KL- and MMD^2-vs-NFE panels for all models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ncols = 1 + len(SOLVERS)
    fig = plt.figure(figsize=(2.7 * ncols, 2.9 * len(models) + 4.0))
    outer = fig.add_gridspec(2, 1, height_ratios=[2.9 * len(models), 4.0], hspace=0.18)
    top = outer[0].subgridspec(len(models), ncols, wspace=0.3, hspace=0.55)
    bottom = outer[1].subgridspec(1, 2 * len(models), wspace=0.3)
    lim = float(mixture.means.abs().max()) + 3.0
    axis = torch.linspace(-lim, lim, 200)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    density = mixture.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).exp().reshape(gx.shape)

    def scatter(ax, pts, title, first_col):
        ax.contour(gx, gy, density, levels=4, colors="0.6", linewidths=0.6)
        pts = pts.detach().float()
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.35, color="C0", rasterized=True)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="$x_1$")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if first_col:
            ax.set_ylabel("$x_2$")

    for row, entry in enumerate(models):
        panels = results[entry.name][1]
        scatter(fig.add_subplot(top[row, 0]), data, f"data (contours: exact density)\nrow: {entry.name} model", True)
        for col, solver in enumerate(SOLVERS, start=1):
            x, steps, nfe = panels[solver]
            label = "adaptive" if steps is None else f"{steps} steps"
            scatter(fig.add_subplot(top[row, col]), x, f"{entry.name}: {solver}\n{label}, NFE {nfe}", False)
    metrics = (("kl", 1, "KL(samples || mixture)  [nats]"), ("mmd2", 0, "MMD$^2$ to data"))
    for i, entry in enumerate(models):
        rows = results[entry.name][0]
        for j, (field, floor_index, label) in enumerate(metrics):
            ax = fig.add_subplot(bottom[0, 2 * i + j])
            values = [getattr(r, field) for r in rows] + [floor[floor_index]]
            for c, solver in enumerate(SOLVERS):
                pts = sorted((r.nfe, getattr(r, field)) for r in rows if r.solver == solver)
                ax.plot(*zip(*pts), marker="o", ms=4, color=f"C{c}", label=solver,
                        linestyle="none" if len(pts) == 1 else "-")
            ax.axhline(floor[floor_index], color="k", linestyle="--", linewidth=1, label="fresh data sample")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            if min(values) > 0:
                ax.set_yscale("log")
            else:
                ax.set_yscale("symlog", linthresh=1e-4)  # unbiased MMD^2 and the KL estimate can dip below 0
            ax.set(xlabel="function evaluations (NFE)", ylabel=label, title=f"{entry.name}: {label.split('  ')[0]} vs NFE")
            ax.title.set_fontsize(10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"genflow demo: 8-Gaussian ring, {data.shape[0]} samples per run; sample panels at "
                 f"{steps_shown} steps (rk45: adaptive, rtol = atol = {RK45_TOL:g}); lower is better below",
                 fontsize=12)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _step_list(text: str) -> tuple:
    values = tuple(_positive_int(part) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts, got {text!r}")
    return tuple(sorted(set(values)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``genflow demo``."""
    parser.add_argument("--no-train", action="store_true",
                        help="skip training: sample the mixture's exact denoiser under --process")
    parser.add_argument("--process", choices=PROCESSES, default=None,
                        help="process of the exact model (with --no-train only; default vp)")
    parser.add_argument("--n", type=_positive_int, default=None,
                        help=f"samples per solver run (default {DEFAULTS['n']}, --quick {QUICK['n']})")
    parser.add_argument("--train-steps", type=_positive_int, default=None,
                        help=f"training iterations per model (default {DEFAULTS['train_steps']}, "
                             f"--quick {QUICK['train_steps']})")
    parser.add_argument("--steps", type=_step_list, default=None,
                        help="comma-separated solver step counts (default 5,10,20,50; --quick 5,10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, noise and data (default 0)")
    parser.add_argument("--out", default="genflow_demo.png", help="path of the figure ('' to skip)")
    parser.add_argument("--quick", action="store_true",
                        help="a small, fast run (for tests): fewer samples, training steps and step counts, "
                             "no repeated timing")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on ``--quick`` and check option combinations (ValueError)."""
    if args.process is not None and not args.no_train:
        raise ValueError("--process applies only with --no-train (the trained models use LinearPath and EDM)")
    if args.no_train and args.train_steps is not None:
        raise ValueError("--train-steps has no effect with --no-train")
    if args.n is not None and args.n < 8:
        raise ValueError(f"--n must be >= 8 (the metrics need a few samples), got {args.n}")
    base = QUICK if args.quick else DEFAULTS
    out = argparse.Namespace(**vars(args))
    for key, value in base.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    out.process = out.process or "vp"
    return out


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed (and ``resolve``d) arguments; prints the table, saves the figure.

    Runs single-threaded (restored afterwards): its tensors are a few thousand 2-D points, too
    small for intra-op threads to pay for their synchronisation (on a busy 2-core machine two
    threads made training five times slower than one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    started = time.perf_counter()
    mixture = gf.GaussianMixture.ring(k=8, radius=4.0, std=0.5)
    data = mixture.sample(args.n, generator=torch.Generator().manual_seed(args.seed + 1))
    fresh = mixture.sample(args.n, generator=torch.Generator().manual_seed(args.seed + 2))
    to_data = MMD(data)
    floor = (to_data(fresh), kl_to_density(fresh, mixture.log_prob))
    k_sampling = peers.k_diffusion_sampling()
    print(f"genflow demo: 8-Gaussian ring, {args.n} samples per run, seed {args.seed}; fused kernels: "
          f"{'C++' if gf.HAS_EXTENSION else 'not built (PyTorch reference)'}; k-diffusion: "
          f"{'installed' if k_sampling is not None else 'not installed (' + peers.K_DIFFUSION_INSTALL + ')'}")
    models = _exact_models(mixture, args) if args.no_train else _trained_models(mixture, args)
    results = {}
    with torch.no_grad():
        for entry in models:
            results[entry.name] = _evaluate(entry, mixture, to_data, args, k_sampling)
    for entry in models:
        schedule = SCHEDULES.get(type(entry.model.process).__name__, "logsnr")
        print(f"{entry.name}: {entry.description}; {schedule} time grid")
    print(_format_table([r for entry in models for r in results[entry.name][0]], floor))
    print(f"ms: best of {args.repeats} run(s). MMD^2: to {args.n} data samples (unbiased, can be < 0). "
          f"KL: KL(samples || mixture) in nats, exact log-density and a k-NN entropy estimate. "
          f"speed-up: k-diffusion's time / genflow's on the same network, sigma grid and starting noise "
          f"('—': no k-diffusion counterpart, LinearPath, or k-diffusion not installed).")
    if args.out:
        _plot(args.out, mixture, data, models, results, floor, _panel_steps(args.steps))
        print(f"saved figure: {args.out}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
