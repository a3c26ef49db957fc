"""``genflow train``, ``genflow sample`` and ``genflow table2``: the training pipelines from the command line.

``genflow train --family flow-matching --data moons --steps 2000 --out runs/fm`` builds the
family (``make_family``), trains it with the Trainer (checkpoints and ``metrics.jsonl`` in
``--out``; an interrupted run resumes from its last checkpoint when started again), writes
``run.json`` (what to rebuild the family from) and a figure of samples, and prints the final
loss and sample quality (MMD to the data; for 2D sets also the KL of seed 003's Table 2).
``genflow sample --checkpoint runs/fm --n 2000 --out x.npy`` rebuilds the family from
``run.json``, loads the newest good checkpoint (EMA weights when saved) and draws samples.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

__all__ = ["add_sample_arguments", "add_table2_arguments", "add_train_arguments", "load_run", "run_sample",
           "run_table2", "run_train"]

RUN_FILE = "run.json"


def _option(text: str):
    """``key=value`` with value parsed as JSON where it can be (numbers, true/false, lists)."""
    if "=" not in text:
        raise ValueError(f"--option takes key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_train_arguments(parser) -> None:
    parser.add_argument("--family", required=True, help="diffusion | flow-matching | rectified-flow | cnf | "
                        "sliced-score | gmm | vae | realnvp | gan | sdflow (genflow.train.FAMILIES)")
    parser.add_argument("--data", default="moons", help="a toy set name (genflow.train.available_datasets()), "
                        "'digits', or a .npy/.npz file")
    parser.add_argument("--n", type=int, default=None, help="data set size (toy sets; default: the set's own)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--decay", default="cosine", choices=("cosine", "linear", "constant"))
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 disables)")
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--conditional", action="store_true", help="condition on the data's labels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a family option, e.g. --option process=EDM --option coupling=ot (repeatable)")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--out", default=None, help="run directory (default runs/<family>-<data>)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if --out has a checkpoint")
    parser.add_argument("--no-progress", action="store_true")


def add_sample_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run directory written by genflow train")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--solver", default=None, help="a genflow solver (families sampled by an ODE/SDE)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.npy", help=".npy file for the samples")
    parser.add_argument("--plot", default=None, help="also save a figure (scatter or image grid) here")


def _family(run: dict):
    from genflow.train.families import make_family

    num_classes = run["num_classes"] if run["conditional"] else None
    return make_family(run["family"], data_shape=tuple(run["data_shape"]), num_classes=num_classes, **run["options"])


def load_run(directory: str):
    """``(family, run)``: the family of a ``genflow train`` run directory with its newest good
    checkpoint loaded (the EMA weights when the run kept them)."""
    from genflow.train.checkpoint import load_latest

    path = os.path.join(directory, RUN_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} is not a genflow train run directory (no {RUN_FILE})")
    with open(path) as f:
        run = json.load(f)
    family = _family(run)
    state, _ = load_latest(directory)
    if state is None:
        raise ValueError(f"{directory!r} holds no checkpoint yet")
    family.load_state_dict(state["family"])
    if state.get("ema") is not None:
        with torch.no_grad():
            for name, p in family.modules.named_parameters():
                p.copy_(state["ema"]["shadow"][name])
    return family, run


def _quality(family, data, seed: int) -> dict:
    """MMD of 2000 samples to the data (and Table 2's KL for 2D points)."""
    from genflow import metrics

    n = min(2000, data.data.shape[0])
    x = family.sample(n, generator=seed).detach().float().cpu().reshape(n, -1)
    ref = data.data[:n].float().reshape(n, -1)
    out = {"mmd": metrics.mmd(x, ref)}
    if ref.shape[1] == 2 and hasattr(metrics, "kl_kde_grid"):
        out["kl_kde_grid"] = metrics.kl_kde_grid(ref, x)
    return out


def run_train(args) -> int:
    from genflow.train.data import load_dataset
    from genflow.train.trainer import TrainConfig, plot_samples, train

    options = dict(_option(o) for o in args.option)
    kwargs = {} if args.n is None else {"n": args.n}
    data = load_dataset(args.data, seed=args.seed, **kwargs)
    out = args.out or os.path.join("runs", f"{args.family}-{os.path.splitext(os.path.basename(args.data))[0]}")
    run = {"family": args.family, "options": options, "data": args.data, "n": args.n, "seed": args.seed,
           "data_shape": list(data.data_shape), "num_classes": data.num_classes, "conditional": args.conditional}
    if args.conditional and data.num_classes is None:
        raise ValueError(f"--conditional needs a labelled data set; {args.data!r} has no labels")
    torch.manual_seed(args.seed)  # the initial weights
    family = _family(run)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, RUN_FILE), "w") as f:
        json.dump(run, f, indent=1)
    if not family.phases:  # fitted in closed form / by EM, not by gradient steps
        family.fit(data.data, seed=args.seed)
        from genflow.train.checkpoint import save_checkpoint
        save_checkpoint(os.path.join(out, "checkpoint.pt"), {"step": 0, "family": family.state_dict(), "ema": None})
    else:
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             decay=args.decay, grad_clip=args.grad_clip or None, ema=args.ema or None, bf16=args.bf16,
                             seed=args.seed, checkpoint_every=args.checkpoint_every)
        result = train(family, data, config, checkpoint_dir=out, resume=not args.no_resume,
                       progress=not args.no_progress)
        if result.ema is not None:
            result.ema.copy_to(family.modules)
        last = {phase: float(curve[-1]) for phase, curve in result.losses.items()}
        print(f"trained {args.family} on {args.data} for {config.steps} steps "
              f"({result.steps_per_s:.1f} steps/s this run); last loss {last}")
    quality = _quality(family, data, args.seed)
    print("sample quality: " + ", ".join(f"{k} {v:.4g}" for k, v in quality.items()))
    figure = plot_samples(family.sample(min(1000, data.data.shape[0]), generator=args.seed),
                          os.path.join(out, "samples.png"), title=f"{args.family} on {args.data}")
    print(f"run directory {out}: {RUN_FILE}, checkpoint.pt, samples figure {figure}")
    return 0


def run_sample(args) -> int:
    from genflow.train.trainer import plot_samples

    family, run = load_run(args.checkpoint)
    options = {k: v for k, v in (("solver", args.solver), ("steps", args.steps)) if v is not None}
    x = family.sample(args.n, generator=args.seed, **options).detach().cpu()
    np.save(args.out, x.numpy())
    print(f"{args.n} samples of {run['family']} ({run['data']}) -> {args.out}")
    if args.plot:
        plot_samples(x, args.plot, title=f"{run['family']} on {run['data']}")
        print(f"figure -> {args.plot}")
    return 0


def add_table2_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="the CI-sized preset (about 45 s of CPU per seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (mean and spread)")
    parser.add_argument("--families", nargs="+", default=None,
                        help="a subset of gmm vae realnvp gan diffusion flow-matching (default: all six)")
    parser.add_argument("--out", default=None, help="directory for table2.json and samples.pt")
    parser.add_argument("--no-progress", action="store_true")


def run_table2(args) -> int:
    from genflow.train import table2

    result = table2.run_table2(quick=args.quick, seeds=tuple(args.seeds), out_dir=args.out,
                               progress=not args.no_progress, families=args.families)
    print(table2.format_table2(result))
    return 0
