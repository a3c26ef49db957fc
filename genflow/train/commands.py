"""``genflow train``, ``genflow sample`` and ``genflow table2``: the training pipelines from the command line.

``genflow train --family flow-matching --data moons --steps 2000 --out runs/fm`` builds the
family (``make_family``), trains it with the Trainer (checkpoints and ``metrics.jsonl`` in
``--out``; an interrupted run resumes from its last checkpoint when started again with the same
options, ``--no-resume`` restarts it), writes ``run.json`` (what to rebuild the family from) and a
figure of samples, and prints the final loss and sample quality (MMD to the data; for 2D sets
also the KL of Bogensperger's Table 2). A run directory holds one configuration: a ``train`` whose
family, options, data or seed differ from its ``run.json`` is refused naming the option, and a
second trainer on a directory in use is refused by its lock file (``genflow.checkpoint.run_lock``).
``genflow sample --checkpoint runs/fm --n 2000 --out x.npy`` rebuilds the family from
``run.json``, loads the newest good checkpoint (EMA weights when saved) and draws samples.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import numpy as np
import torch

from genflow._checks import check_int, check_real

__all__ = ["RUN_KEYS", "add_sample_arguments", "add_table2_arguments", "add_train_arguments", "load_run",
           "output_path", "read_run", "run_sample", "run_table2", "run_train"]

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
    parser.add_argument("--on-nonfinite", default="raise", choices=("raise", "skip"),
                        help="a NaN/Inf loss stops training naming the step (raise) or its update is dropped (skip)")
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


RUN_KEYS = ("family", "options", "data", "n", "seed", "data_shape", "num_classes", "conditional")
# the command-line option behind each run.json key (data_shape and num_classes follow from --data)
_RUN_OPTIONS = {"family": "--family", "options": "--option", "data": "--data", "n": "--n", "seed": "--seed",
                "data_shape": "--data", "num_classes": "--data", "conditional": "--conditional"}


def _family(run: dict):
    from genflow.train.families import make_family

    num_classes = run["num_classes"] if run["conditional"] else None
    return make_family(run["family"], data_shape=tuple(run["data_shape"]), num_classes=num_classes, **run["options"])


def read_run(path: str) -> dict:
    """The ``run.json`` at ``path``, checked: a ValueError naming the file when it is not valid
    JSON, lacks keys or has keys of the wrong type."""
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable run file ({type(err).__name__}: {err}); "
                         f"it is corrupt or was cut short") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(run).__name__}")
    missing = [key for key in RUN_KEYS if key not in run]
    if missing:
        raise ValueError(f"{path} is incomplete: it lacks {missing} (a run file has {list(RUN_KEYS)})")
    types = {"family": str, "options": dict, "data": str, "data_shape": list, "conditional": bool}
    for key, kind in types.items():
        if not isinstance(run[key], kind):
            raise ValueError(f"{path}: {key!r} must be a {kind.__name__}, got {run[key]!r}")
    return run


def _run_difference(saved: dict, run: dict) -> Optional[str]:
    """The first option in which ``run`` differs from the ``saved`` run.json, described, or None."""
    for key in RUN_KEYS:
        if saved.get(key) == run[key]:
            continue
        if key == "options":
            for name in sorted(set(saved["options"]) | set(run["options"])):
                old, new = saved["options"].get(name, "(unset)"), run["options"].get(name, "(unset)")
                if old != new:
                    return f"--option {name}: the run directory has {old!r}, this run {new!r}"
        return f"{_RUN_OPTIONS[key]} ({key}): the run directory has {saved.get(key)!r}, this run {run[key]!r}"
    return None


def load_run(directory: str):
    """``(family, run)``: the family of a ``genflow train`` run directory with its newest good
    checkpoint loaded (the EMA weights when the run kept them).

    Raises:
        ValueError: naming the file: no or a corrupt/incomplete ``run.json``, no checkpoint, or a
            checkpoint whose weights do not fit the networks ``run.json`` describes.
    """
    from genflow.checkpoint import load_latest
    from genflow.train.trainer import family_name

    path = os.path.join(directory, RUN_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} is not a genflow train run directory (no {RUN_FILE})")
    run = read_run(path)
    try:
        family = _family(run)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} describes no family that can be built: {err}") from None
    state, used = load_latest(directory)
    if state is None:
        raise ValueError(f"{directory!r} holds no checkpoint yet")
    saved_name = state.get("family_name")
    if saved_name is not None and saved_name != family_name(family):
        raise ValueError(f"checkpoint {used!r} holds family {saved_name!r}, but {path} describes "
                         f"{family_name(family)!r}")
    try:
        family.load_state_dict(state["family"])
        if state.get("ema") is not None:
            with torch.no_grad():
                for name, p in family.modules.named_parameters():
                    p.copy_(state["ema"]["shadow"][name])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise ValueError(f"checkpoint {used!r} does not match the options in {path} (family {run['family']!r}, "
                         f"options {run['options']}): {' '.join(lines[:2]) or type(err).__name__}") from None
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


def _check_train_args(args) -> None:
    """Counts and rates of ``genflow train``, each error naming its option."""
    for option, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("checkpoint_every", 0), ("seed", 0)):
        check_int("--" + option.replace("_", "-"), getattr(args, option), low=low)
    if args.n is not None:
        check_int("--n", args.n, low=1)
    check_real("--lr", args.lr, low=0.0, low_open=True)
    check_real("--grad-clip", args.grad_clip, low=0.0)
    if not 0 <= check_real("--ema", args.ema) < 1:
        raise ValueError(f"--ema must be in [0, 1) (0 disables it), got {args.ema}")


def _make_folder(option: str, folder: str, path: Optional[str] = None) -> None:
    """Create ``folder``; a ValueError naming ``option`` (and ``path``) when it cannot be created or written."""
    where = option if path is None else f"{option} {path!r}"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{where}: cannot create the folder {folder!r} ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{where}: the folder {folder!r} is not writable")


def output_path(option: str, path: str, suffix: str = "") -> str:
    """``path`` (with ``suffix`` appended when it lacks it) after creating its folder; a
    ValueError naming ``option`` when the folder cannot be created or written, or ``path`` is a folder."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(os.sep):
        raise ValueError(f"{option} {path!r} is a folder; give a file name")
    if suffix and not path.endswith(suffix):
        path += suffix
    _make_folder(option, os.path.dirname(os.path.abspath(path)), path)
    return path


def _figure_path(path: str) -> str:
    """``--plot``'s path, checked before anything is computed: a format matplotlib writes, a
    folder that exists or can be created."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        raise ValueError(f"--plot {path!r}: the file name must end in an image format matplotlib writes "
                         f"({', '.join(sorted(formats))}), got {extension or 'no extension'!r}")
    return output_path("--plot", path)


def _write_run(directory: str, run: dict) -> None:
    """Write run.json atomically (a temporary file renamed into place)."""
    fd, tmp = tempfile.mkstemp(prefix=RUN_FILE + ".", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(run, f, indent=1)
    os.replace(tmp, os.path.join(directory, RUN_FILE))


def run_train(args) -> int:
    from genflow.checkpoint import run_lock
    from genflow.train.data import load_dataset

    _check_train_args(args)
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
    _make_folder("--out", out)
    with run_lock(out):
        saved_path = os.path.join(out, RUN_FILE)
        if os.path.exists(saved_path):
            difference = _run_difference(read_run(saved_path), run)
            if difference is not None:
                raise ValueError(f"run directory {out!r} belongs to another configuration, {difference}; use "
                                 f"another --out (a run directory holds one configuration)")
        _write_run(out, run)
        _train_family(args, family, data, out)
    return 0


def _train_family(args, family, data, out: str) -> None:
    """Fit or train ``family`` into the run directory ``out``, then report quality and save the figure."""
    from genflow.train.trainer import TrainConfig, family_name, plot_samples, train

    if not family.phases:  # fitted in closed form / by EM, not by gradient steps
        family.fit(data.data, seed=args.seed)
        from genflow.checkpoint import save_checkpoint
        save_checkpoint(os.path.join(out, "checkpoint.pt"), {"step": 0, "family": family.state_dict(), "ema": None,
                                                             "family_name": family_name(family)})
    else:
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             decay=args.decay, grad_clip=args.grad_clip or None, ema=args.ema or None, bf16=args.bf16,
                             seed=args.seed, checkpoint_every=args.checkpoint_every,
                             on_nonfinite=args.on_nonfinite)
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


def run_sample(args) -> int:
    from genflow.train.trainer import plot_samples

    n = check_int("--n", args.n, low=1)
    steps = None if args.steps is None else check_int("--steps", args.steps, low=1)
    seed = check_int("--seed", args.seed, low=0)
    out = output_path("--out", args.out, ".npy")
    plot = None if args.plot is None else _figure_path(args.plot)
    family, run = load_run(args.checkpoint)
    options = {k: v for k, v in (("solver", args.solver), ("steps", steps)) if v is not None}
    x = family.sample(n, generator=seed, **options).detach().cpu()
    np.save(out, x.numpy())
    print(f"{n} samples of {run['family']} ({run['data']}) -> {out}")
    if plot is not None:
        plot_samples(x, plot, title=f"{run['family']} on {run['data']}")
        print(f"figure -> {plot}")
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
