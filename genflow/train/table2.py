"""``genflow table2``: the six families of Bogensperger, "Introduction to Generative Modeling", Table 2, trained on one toy set and scored by KL.

Every family is trained on the Table-2 toy set (``load_dataset("table2", seed=s)``: 8 Gaussians
of covariance 0.1 I at radius 4/sqrt(2), 250 points each), 2000 samples are drawn and scored
with ``genflow.metrics.kl_kde_grid(data, samples)`` (KL(data || model) between Gaussian KDEs of
bandwidth 0.4 on a 100x100 grid). The GMM is fitted by EM (``GMMFamily.fit``: it has no
training phases); the others by ``genflow.train.trainer.train`` (VAE, RealNVP, GAN from
``genflow.train.classic``; diffusion and flow matching from ``genflow.train.families``), and
sampled with their EMA weights when the preset keeps an EMA. The data-vs-data floor scores the
data against an independent draw of the same set.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch

from genflow._checks import check_int
from genflow.metrics import kl_kde_grid
from genflow.train.classic import CLASSIC_FAMILIES
from genflow.train.data import load_dataset
from genflow.train.families import make_family
from genflow.train.trainer import TrainConfig, train

__all__ = ["PRESETS", "PUBLISHED", "format_table2", "run_table2"]

# Bogensperger, "Introduction to Generative Modeling", Table 2: KL between the generated samples and the data
PUBLISHED = {"gmm": 0.0099, "vae": 0.0950, "realnvp": 0.0165, "gan": 0.1502, "diffusion": 0.0149,
             "flow-matching": 0.0164}
LABELS = {"gmm": "GMM", "vae": "VAE", "realnvp": "Normalizing flow", "gan": "GAN", "diffusion": "Diffusion model",
          "flow-matching": "Flow matching"}
N_SAMPLES = 2000
_FLOOR_SEED = 1_000_003   # the independent data draw of the floor: seed _FLOOR_SEED + s
_SAMPLE_SEED = 7_919      # sampling seed: _SAMPLE_SEED + s


def _preset(steps: dict, lr: dict, width: int, ema: float, realnvp: dict) -> dict:
    """name -> (family options, TrainConfig options); the GMM's entry holds its ``fit`` options.

    ``steps``, ``lr``: training steps and peak learning rate per gradient-trained family (the GAN
    trains with Adam betas (0.5, 0.9) and no decay); ``width``: hidden width of every network but
    RealNVP's; ``ema``: the EMA decay the samples are drawn with; ``realnvp``: the flow's
    ``layers`` (couplings), ``hidden`` width, ``rotations`` (a fixed random rotation before each
    coupling) and ``batch_size`` (the others train on batches of 256).
    """
    def config(name, **extra):
        return dict({"steps": steps[name], "batch_size": 256, "lr": lr[name], "ema": ema}, **extra)
    return {
        "gmm": ({"components": 8, "init": "kmeans"}, {"max_iter": 500, "tol": 1e-6}),
        "vae": ({"latent": 2, "hidden": width, "layers": 3, "sample_mean": True}, config("vae")),
        "realnvp": ({"layers": realnvp["layers"], "hidden": realnvp["hidden"], "depth": 2,
                     "rotations": realnvp["rotations"]},
                    config("realnvp", batch_size=realnvp["batch_size"])),
        "gan": ({"latent": 2, "hidden": width, "layers": 3, "penalty": "r1", "gamma": 0.1},
                config("gan", betas=(0.5, 0.9), decay="constant")),
        "diffusion": ({"process": "EDM", "net_options": {"hidden": width, "layers": 3}}, config("diffusion")),
        "flow-matching": ({"net_options": {"hidden": width, "layers": 3}}, config("flow-matching")),
    }


PRESETS = {
    "full": _preset({"vae": 10000, "realnvp": 8000, "gan": 6000, "diffusion": 4000, "flow-matching": 4000},
                    {"vae": 2e-3, "realnvp": 2e-3, "gan": 1e-3, "diffusion": 2e-3, "flow-matching": 2e-3},
                    width=128, ema=0.999, realnvp={"layers": 16, "hidden": 64, "rotations": True, "batch_size": 512}),
    # one seed in about 45 s of CPU (tests/train/test_metrics_table2.py): every family within 4x of PUBLISHED
    "quick": _preset({"vae": 1500, "realnvp": 1200, "gan": 600, "diffusion": 1200, "flow-matching": 800},
                     {"vae": 5e-3, "realnvp": 2e-2, "gan": 1.5e-3, "diffusion": 5e-3, "flow-matching": 5e-3},
                     width=64, ema=0.98, realnvp={"layers": 8, "hidden": 64, "rotations": False, "batch_size": 512}),
}


def _mean_std(values: Sequence[float]):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _build(name: str, options: dict):
    if name in CLASSIC_FAMILIES:
        return CLASSIC_FAMILIES[name](data_shape=(2,), **options)
    return make_family(name, data_shape=(2,), **options)


def _train_and_sample(name: str, data, seed: int, options: dict, config: dict, steps: Optional[int],
                      progress: bool) -> torch.Tensor:
    torch.manual_seed(seed)
    family = _build(name, options)
    if name == "gmm":
        family.fit(data, seed=seed, **config)
        return family.sample(N_SAMPLES, generator=_SAMPLE_SEED + seed)
    config = dict(config, seed=seed, log_every=0)
    if steps is not None:
        config["steps"] = steps
    result = train(family, data, TrainConfig(**config), progress=progress)
    if result.ema is None:
        return family.sample(N_SAMPLES, generator=_SAMPLE_SEED + seed)
    with result.ema.applied(family.modules):
        return family.sample(N_SAMPLES, generator=_SAMPLE_SEED + seed)


def run_table2(*, quick: bool = False, seeds: Sequence[int] = (0, 1, 2), out_dir: Optional[str] = None,
               progress: bool = True, families: Optional[Sequence[str]] = None, steps: Optional[int] = None) -> dict:
    """Train the Table-2 families per seed, sample 2000 points each and score them by ``kl_kde_grid``.

    Args:
        quick: the CI preset (small networks, a few hundred steps) instead of the full one.
        seeds: one run per seed (data draw, initialisation, training and sampling all seeded).
        out_dir: if given, ``table2.json`` (the result) and ``samples.pt`` ({family: Tensor[S, 2000, 2]}) go there.
        progress: a line per run on stderr (and the trainer's bar).
        families: a subset of ``PUBLISHED``'s names (default all six, in the table's order).
        steps: overrides the training steps of every gradient-trained family (smoke tests).

    The run uses one intra-op thread (restored after): the networks are tiny, and more threads
    only add synchronisation.

    Returns:
        ``{"preset", "seeds", "n_samples", "seconds", "floor": {"kl", "mean", "std"},
        "families": {name: {"kl": [per seed], "mean", "std", "published", "seconds"}}}``.
    """
    names = list(PUBLISHED) if families is None else list(families)
    unknown = [n for n in names if n not in PUBLISHED]
    if unknown or not names:
        raise ValueError(f"families must be a non-empty subset of {tuple(PUBLISHED)}, got {families!r}")
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints >= 0, got {seeds!r}")
    steps = None if steps is None else check_int("steps", steps, low=1)
    preset_name = "quick" if quick else "full"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the networks are tiny: intra-op threads only add synchronisation
    try:
        result = _run(names, seeds, preset_name, steps, progress)
    finally:
        torch.set_num_threads(threads)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "table2.json"), "w") as f:
            json.dump({k: v for k, v in result.items() if k != "samples"}, f, indent=2)
        torch.save({name: torch.stack(xs) for name, xs in result["samples"].items()},
                   os.path.join(out_dir, "samples.pt"))
    del result["samples"]
    return result


def _run(names, seeds, preset_name: str, steps: Optional[int], progress: bool) -> dict:
    preset = PRESETS[preset_name]
    start = time.perf_counter()
    floor = []
    runs = {name: {"kl": [], "seconds": 0.0} for name in names}
    samples = {name: [] for name in names}
    for seed in seeds:
        data = load_dataset("table2", seed=seed)
        floor.append(kl_kde_grid(data.data, load_dataset("table2", seed=_FLOOR_SEED + seed).data))
        for name in names:
            t0 = time.perf_counter()
            x = _train_and_sample(name, data, seed, *preset[name], steps, progress).float().cpu()
            runs[name]["seconds"] += time.perf_counter() - t0
            runs[name]["kl"].append(kl_kde_grid(data.data, x) if bool(torch.isfinite(x).all()) else math.inf)
            samples[name].append(x)
            if progress:
                print(f"table2 [{preset_name}] seed {seed} {name}: KL {runs[name]['kl'][-1]:.4f} "
                      f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    for name in names:
        runs[name]["mean"], runs[name]["std"] = _mean_std(runs[name]["kl"])
        runs[name]["published"] = PUBLISHED[name]
    floor_mean, floor_std = _mean_std(floor)
    return {"preset": preset_name, "seeds": seeds, "n_samples": N_SAMPLES, "seconds": time.perf_counter() - start,
            "floor": {"kl": floor, "mean": floor_mean, "std": floor_std}, "families": runs, "samples": samples}


def format_table2(result: dict) -> str:
    """The result of :func:`run_table2` as a text table: KL mean ± std over seeds next to the published figure."""
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [f"Table 2 (Bogensperger, 'Introduction to Generative Modeling'): KL(data || model), Gaussian KDEs (h = 0.4) on a 100x100 grid, "
             f"{result['n_samples']} samples; {result['preset']} preset, seeds {seeds}, {result['seconds']:.1f} s",
             f"{'family':<18}{'KL (mean ± std)':>20}{'published':>12}{'train s':>10}"]
    for name, run in result["families"].items():
        verdict = "" if run["mean"] <= run["published"] else "  (above)"
        lines.append(f"{LABELS[name]:<18}{run['mean']:>11.4f} ± {run['std']:<6.4f}{run['published']:>12.4f}"
                     f"{run['seconds']:>10.1f}{verdict}")
    floor = result["floor"]
    lines.append(f"{'data vs data':<18}{floor['mean']:>11.4f} ± {floor['std']:<6.4f}{'-':>12}{'':>10}")
    return "\n".join(lines)
