"""``genflow bench``: genflow against eager PyTorch, ``torch.compile``, the bandwidth floor and the
peer libraries, side by side in one run.

Every row times genflow and one baseline on equal work, interleaving their rounds and keeping the
best round of each (the machine may be busy: a best-of-N is the least noisy estimate of what the
code costs). Before anything is timed, the baseline's result is checked against genflow's on the
same inputs (the same noise where there is noise) and the largest difference is reported; a row
whose results disagree is not timed and makes the run fail.

Row groups (``--only``) live in a registry, ``GROUPS``: a group is a function ``build(ctx)``
yielding ``Case`` objects (one genflow callable and its baselines). Adding rows is adding a
function decorated with ``@group(name, title)``::

    @group("likelihood", "log-likelihood vs torchdiffeq")
    def _likelihood(ctx):
        yield Case("hutchinson", "(4096, 2)", genflow=lambda: ..., baselines=[Baseline("torchdiffeq", fn, check=...)])

Ratios are baseline time / genflow time: > 1 means genflow is faster. For ``floor`` rows the
ratio is the fraction of the floor genflow reaches (1.0 = at the floor; it cannot exceed 1 by much).

The groups themselves live in the source checkout's ``bench/cases/`` (one module per peer or
topic, shared networks in ``bench/cases/common.py``); this module is the harness and imports them
when it is imported. An installed copy without the checkout has the harness and no groups.

Entry points: ``add_arguments(parser)`` and ``run(args) -> int`` (the CLI's ``genflow bench``)
and ``main(argv=None)`` (``python -m genflow.bench``).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import torch

from genflow.bench_rows import HEADER, Row, markdown_table, row_line

__all__ = ["Agreement", "Baseline", "Case", "Context", "GROUPS", "Row", "add_arguments", "group", "main",
           "run", "run_cases", "update_results"]

SCHEMA = "genflow-bench/1"
BEGIN = "<!-- genflow-bench:begin {key} -->"
END = "<!-- genflow-bench:end {key} -->"
GROUP_MARK = "<!-- genflow-bench:group {name} -->"


# ---------------------------------------------------------------- registry and data

@dataclass
class Context:
    """What a group builder needs: the device, the mode and the timing policy."""

    device: str = "cpu"
    quick: bool = False
    rounds: int = 5           # timed rounds per callable (best one kept)
    round_s: float = 0.02     # target length of one round (the repeat count is set to reach it)
    fn_budget_s: float = 4.0  # a callable stops taking rounds (>= 2 taken) once it used this much
    dtype: torch.dtype = torch.float32
    tiny: bool = False        # tests: the smallest sizes
    compile: bool = True      # include the torch.compile baselines (compiling takes seconds)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def randn(self, *shape, seed=0, dtype=None):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g, dtype=dtype or self.dtype).to(self.device)


@dataclass
class Agreement:
    """The check run before timing: ``max_err`` (absolute) against ``tol * scale``."""

    max_err: float
    scale: float = 1.0
    tol: float = 1e-4
    how: str = "max |genflow - peer|, relative to max |peer|"
    extra: dict = field(default_factory=dict)   # e.g. nfe_genflow, nfe_peer, err_genflow, err_peer

    @property
    def rel(self) -> float:
        return self.max_err / self.scale if self.scale > 0 else self.max_err

    @property
    def ok(self) -> bool:
        return math.isfinite(self.rel) and self.rel <= self.tol


@dataclass
class Baseline:
    """One thing genflow is compared with in a case.

    kind: "peer" (a library or eager/compiled PyTorch doing the same work), "floor" (a device
    copy moving the bytes the genflow op must move) or "bound" (work genflow cannot avoid, e.g.
    the model's own evaluations: ratio 1.0 means the solver's own cost vanished). ``check`` returns an ``Agreement`` (peers
    must have one); ``fn=None`` with ``status`` set marks a baseline that cannot run here.
    """

    name: str
    fn: Optional[Callable[[], object]] = None
    check: Optional[Callable[[], Agreement]] = None
    kind: str = "peer"
    note: str = ""
    status: str = "ok"
    setup: Optional[Callable[[], str]] = None  # run once before the check (e.g. compile); returns a note
    bytes: Optional[int] = None  # floors: the bytes the copy moves (read + write), for its GB/s


@dataclass
class Case:
    """One genflow callable and the baselines it is timed against."""

    name: str
    size: str
    genflow: Callable[[], object]
    baselines: List[Baseline]
    note: str = ""


@dataclass
class Group:
    name: str
    title: str
    build: Callable[[Context], Iterable[Case]]


GROUPS: dict = {}


def group(name: str, title: str):
    """Register ``build(ctx) -> iterable of Case`` as the row group ``name`` (runs in registration order)."""
    def register(build):
        GROUPS[name] = Group(name, title, build)
        return build
    return register


# ---------------------------------------------------------------- timing and checks

def time_interleaved(fns: dict, ctx: Context) -> dict:
    """Milliseconds per call of each zero-argument callable: best of ``ctx.rounds`` rounds, rounds
    of the callables interleaved (a burst of load hits them alike), the device synchronised before
    each timer is read. Each round repeats a callable enough times to last ``ctx.round_s``."""
    reps = {}
    for k, fn in fns.items():
        ctx.sync()
        start = time.perf_counter()
        fn()  # warm-up (first-call costs: caches, compilation)
        ctx.sync()
        est = time.perf_counter() - start
        if est < 2 * ctx.round_s:  # fast: estimate again without the first-call costs
            start = time.perf_counter()
            fn()
            ctx.sync()
            est = time.perf_counter() - start
        reps[k] = max(1, min(100_000, int(ctx.round_s / max(est, 1e-7))))
    best = {k: math.inf for k in fns}
    spent = {k: 0.0 for k in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(ctx.rounds):
            for k, fn in fns.items():
                if r >= 2 and spent[k] > ctx.fn_budget_s:
                    continue
                ctx.sync()
                start = time.perf_counter()
                for _ in range(reps[k]):
                    fn()
                ctx.sync()
                elapsed = time.perf_counter() - start
                spent[k] += elapsed
                best[k] = min(best[k], elapsed / reps[k])
    finally:
        if was_enabled:
            gc.enable()
    return {k: 1e3 * v for k, v in best.items()}


def agree(ours: torch.Tensor, theirs: torch.Tensor, tol: float, **extra) -> Agreement:
    """``max |ours - theirs|`` against ``tol * max |theirs|`` (NaN anywhere fails)."""
    ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
    if ours.shape != theirs.shape:
        return Agreement(math.inf, 1.0, tol, f"shapes differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}", extra)
    diff = (ours - theirs).abs().max().item()
    scale = max(theirs.abs().max().item(), 1e-30)
    return Agreement(diff if math.isfinite(diff) else math.inf, scale, tol, extra=extra)


class Counted:
    """A network wrapper counting its calls (NFE) for the agreement run."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


# ---------------------------------------------------------------- the runner

def run_cases(ctx: Context, names: Optional[Iterable[str]] = None, *, log=print) -> List[Row]:
    """Build and run the cases of the groups ``names`` (default all); returns one Row per baseline."""
    names = list(GROUPS) if names is None else list(names)
    rows: List[Row] = []
    for name in names:
        grp = GROUPS[name]
        log(f"\n== {name}: {grp.title}")
        log(HEADER)
        log("-" * len(HEADER))
        for case in grp.build(ctx):
            rows.extend(_run_case(ctx, name, case, log))
        gc.collect()
    return rows


def _run_case(ctx: Context, group_name: str, case: Case, log) -> List[Row]:
    rows, timed = [], {}
    for b in case.baselines:
        row = Row(group_name, case.name, case.size, b.name, b.kind, b.status, bytes=b.bytes,
                  note="; ".join(filter(None, [case.note, b.note])))
        rows.append(row)
        if b.fn is None:
            if row.status == "ok":
                row.status = "skipped"
            continue
        try:
            if b.setup is not None:
                extra = b.setup()
                row.note = "; ".join(filter(None, [row.note, extra]))
            if b.check is not None:
                a = b.check()
                row.max_err, row.rel_err, row.tol, row.check = a.max_err, a.rel, a.tol, a.how
                row.nfe_genflow = a.extra.get("nfe_genflow")
                row.nfe_baseline = a.extra.get("nfe_peer")
                row.err_genflow = a.extra.get("err_genflow")
                row.err_baseline = a.extra.get("err_peer")
                if a.extra.get("law"):  # a statistical check: its value is in standard errors, not relative
                    row.rel_err = None
                    row.note = "; ".join(filter(None, [row.note, f"noise law {a.max_err:.1f} s.e. (tol {a.tol:g})"]))
                if not a.ok:
                    row.status = "DIFFERS"
                    continue
            elif b.kind == "peer":
                raise RuntimeError(f"peer baseline {b.name!r} has no agreement check")
        except Exception as error:  # a broken peer must not end the run: report it
            row.status = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
            continue
        timed[b.name] = b.fn
    if timed:
        try:
            ms = time_interleaved({"__genflow__": case.genflow, **timed}, ctx)
        except Exception as error:
            for row in rows:
                if row.baseline in timed:
                    row.status = f"error: {type(error).__name__}: {str(error)[:120]}"
            ms = None
        if ms is not None:
            for row in rows:
                if row.baseline in timed:
                    row.genflow_ms, row.baseline_ms = ms["__genflow__"], ms[row.baseline]
                    row.ratio = row.baseline_ms / row.genflow_ms if row.genflow_ms > 0 else None
    for row in rows:
        log(row_line(row))
    return rows


# ---------------------------------------------------------------- formatting

def format_table(rows: List[Row]) -> str:
    """The console table, one block per group."""
    header = HEADER
    lines = []
    for name, grp_rows in itertools.groupby(rows, key=lambda r: r.group):
        lines.append(f"\n== {name}: {GROUPS[name].title if name in GROUPS else ''}")
        lines.append(header)
        lines.append("-" * len(header))
        lines.extend(row_line(r) for r in grp_rows)
    return "\n".join(lines)


# ---------------------------------------------------------------- machine info, JSON, RESULTS.md

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import genflow
    from genflow._extension import HAS_EXTENSION, has_cuda_kernels

    peers = {}
    for name in ("diffusers", "torchdiffeq", "torchsde", "k_diffusion", "flow_matching", "torchcfm"):
        try:
            from importlib.metadata import version
            peers[name] = version(name.replace("_", "-"))
        except Exception:
            peers[name] = None
    info = {
        "cpu_model": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "genflow": genflow.__version__, "extension": HAS_EXTENSION, "cuda_kernels": has_cuda_kernels(),
        "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
        "peers": peers,
    }
    try:
        info["load_average"] = os.getloadavg()[0]
    except OSError:
        info["load_average"] = None
    if device == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def copy_bandwidth(ctx: Context, nbytes: int = 256 << 20) -> float:
    """Device copy bandwidth in GB/s (bytes read + bytes written per second) of a large copy."""
    n = max(1, nbytes // 8) if not ctx.tiny else 1 << 16
    src = torch.ones(n, dtype=torch.float32, device=ctx.device)
    dst = torch.empty_like(src)
    ms = time_interleaved({"copy": lambda: dst.copy_(src)}, ctx)["copy"]
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def update_results(path, key: str, rows: List[Row], *, header: str) -> None:
    """Rewrite the auto-generated block ``key`` of ``path`` (markdown), between markers; groups not in
    ``rows`` keep their previous tables; everything outside the markers is left as it was. The block
    is appended (with a heading) when the file has none."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    begin, end = BEGIN.format(key=key), END.format(key=key)
    groups = {}
    if begin in text and end in text:
        start = text.index(begin)
        stop = text.index(end, start) + len(end)
        old = text[start + len(begin):stop - len(end)]
        for part in re.split(r"(?=<!-- genflow-bench:group )", old)[1:]:
            m = re.match(r"<!-- genflow-bench:group (\S+) -->", part)
            if m:
                groups[m.group(1)] = part.rstrip() + "\n"
    else:
        start = stop = None
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    for name, grp_rows in itertools.groupby(rows, key=lambda r: r.group):
        title = GROUPS[name].title if name in GROUPS else name
        groups[name] = (f"{GROUP_MARK.format(name=name)}\n#### {name}: {title} ({stamp})\n\n"
                        f"{markdown_table(list(grp_rows))}\n")
    order = list(GROUPS) + sorted(set(groups) - set(GROUPS))
    body = "\n".join(groups[n] for n in order if n in groups)
    block = (f"{begin}\n{header}\n\n{body}{end}")
    if start is None:
        text = text.rstrip("\n") + f"\n\n## `genflow bench` ({key}), auto-generated\n\n{block}\n"
    else:
        text = text[:start] + block + text[stop:]
    path.write_text(text)


def _busy(info: dict) -> bool:
    load, cores = info.get("load_average"), info.get("cores")
    return load is not None and bool(cores) and load > 0.5 * cores


def _results_header(info: dict, argv: str, bandwidth: float) -> str:
    return (f"Auto-generated by `{argv}` (edits inside these markers are overwritten; the history above "
            f"is hand-written). Last run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: "
            f"{info['device_name']} ({info['cores']} cores, {info['torch_threads']} threads), torch "
            f"{info['torch']}, genflow {info['genflow']}, device copy {bandwidth:.1f} GB/s"
            + (f", load average {info['load_average']:.1f} at the start" if info.get("load_average") is not None else "")
            + (" (a busy machine: noisy numbers)" if _busy(info) else "") + ". "
            "Ratio = baseline time / genflow time (> 1: genflow faster; for `floor` rows the fraction of "
            "the bandwidth floor genflow reaches). Best of several interleaved rounds; \"rel err\" is the "
            "largest difference of the outputs on equal inputs, relative to the baseline's largest value, "
            "checked before timing.")


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``genflow bench``'s options to ``parser``."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer and smaller cases, fewer rounds (about 1-2 minutes on a 2-core CPU)")
    parser.add_argument("--only", action="append", metavar="GROUP",
                        help=f"run only these row groups (repeat or comma-separate): {', '.join(GROUPS)}")
    parser.add_argument("--list", action="store_true", help="list the row groups and exit")
    parser.add_argument("--json", metavar="PATH", help="write machine info and every row's numbers as JSON")
    parser.add_argument("--results", metavar="PATH",
                        help="markdown file whose auto-generated table is updated (default bench/RESULTS.md "
                             "when it exists in the current directory)")
    parser.add_argument("--no-results", action="store_true", help="do not update any results file")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per callable, best kept (default 5, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (they take "
                        "~15 s to compile on a CPU)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: smallest sizes
    return parser


def _selected(only) -> List[str]:
    if not only:
        return list(GROUPS)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; groups are {list(GROUPS)}")
    return names


def run(args: argparse.Namespace) -> int:
    """Run ``genflow bench`` with parsed ``args``; returns the exit code (0 ok, 1 a row failed its
    agreement check or errored, 2 a usage error such as --device cuda without CUDA)."""
    if getattr(args, "list", False):
        for g in GROUPS.values():
            print(f"{g.name:<14}{g.title}")
        return 0
    try:
        names = _selected(args.only)
    except ValueError as error:
        print(f"genflow bench: error: {error}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        print(f"genflow bench: error: --device cuda requested but CUDA is not available: {why} "
              f"(torch {torch.__version__}). Run with --device cpu.", file=sys.stderr)
        return 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    quick = bool(args.quick)
    rounds = args.rounds if getattr(args, "rounds", None) else (3 if quick else 5)
    tiny = bool(getattr(args, "tiny", False))
    ctx = Context(device=args.device, quick=quick, rounds=rounds, round_s=0.001 if tiny else 0.02 if quick else 0.1,
                  fn_budget_s=1.5 if quick else 6.0, tiny=tiny,
                  compile=not getattr(args, "no_compile", False))
    argv = "genflow bench " + " ".join(getattr(args, "argv", None) or _argv_of(args))
    started = time.perf_counter()
    info = machine_info(args.device)
    bandwidth = copy_bandwidth(ctx)
    print(f"genflow bench on {info['device_name']} ({info['cores']} cores, {info['torch_threads']} threads), "
          f"torch {info['torch']}, genflow {info['genflow']} ({'C++ kernels' if info['extension'] else 'NO extension: PyTorch reference'}), "
          f"device copy {bandwidth:.1f} GB/s; {'quick' if quick else 'full'} run, best of {rounds} rounds")
    if _busy(info):
        print(f"WARNING: the machine is busy (load average {info['load_average']:.1f} on {info['cores']} cores): timings are noisy; "
              "rerun on a quiet machine before quoting them (OpenMP regions stall when threads outnumber free cores: "
              "--threads 1 helps)")
    print("ratio = baseline ms / genflow ms (> 1: genflow faster; floor rows: fraction of the bandwidth floor reached)")
    rows = run_cases(ctx, names, log=lambda line: print(line, flush=True))
    wall = time.perf_counter() - started
    failed = [r for r in rows if r.status == "DIFFERS" or r.status.startswith("error")]
    behind = [r for r in rows if r.ahead == "NO"]
    print(f"\n{len(rows)} rows in {wall:.1f} s; genflow ahead in "
          f"{sum(r.ahead == 'yes' for r in rows)}/{sum(r.ahead != '-' for r in rows)} peer rows"
          + (f"; NOT ahead: {', '.join(f'{r.case} {r.size} vs {r.baseline}' for r in behind)}" if behind else ""))
    if failed:
        print(f"{len(failed)} rows failed: " + "; ".join(f"{r.case} {r.size} vs {r.baseline}: {r.status}" for r in failed))
    if args.json:
        doc = {"schema": SCHEMA, "created": datetime.datetime.now().isoformat(timespec="seconds"), "command": argv,
               "quick": quick, "rounds": rounds, "machine": info, "copy_bandwidth_GBps": bandwidth,
               "wall_s": wall, "groups": {n: GROUPS[n].title for n in names},
               "rows": [r.as_dict() for r in rows]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    results = None if args.no_results else (args.results or ("bench/RESULTS.md" if Path("bench/RESULTS.md").exists() else None))
    if results:
        key = args.device + (" quick" if quick else "")
        update_results(results, key, rows, header=_results_header(info, argv, bandwidth))
        print(f"updated the '{key}' table in {results}")
    elif not args.no_results:
        print("results table not updated (no bench/RESULTS.md here; pass --results PATH)")
    return 1 if failed else 0


def _argv_of(args) -> list:
    out = [f"--device {args.device}"] if args.device != "cpu" else []
    if args.quick:
        out.append("--quick")
    for item in args.only or []:
        out.append(f"--only {item}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="genflow bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


# ---------------------------------------------------------------- the row groups

CASES_DIR = Path(__file__).resolve().parents[1] / "bench" / "cases"
CASE_MODULES = ("ops", "model", "k_diffusion", "diffusers", "torchdiffeq", "torchsde", "solve", "likelihood", "kernel",
                "train", "league")


def load_cases() -> dict:
    """Import ``bench/cases/<module>`` for each of ``CASE_MODULES`` (each registers its groups with
    ``@group``, in this order) from the source checkout beside this package; returns ``GROUPS``
    (empty when the checkout is absent)."""
    if not CASES_DIR.is_dir():
        return GROUPS
    root = str(CASES_DIR.parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    for name in CASE_MODULES:
        importlib.import_module(f"bench.cases.{name}")
    return GROUPS


if __name__ == "__main__":  # the cases register with the importable genflow.bench, not with __main__
    sys.exit(importlib.import_module("genflow.bench").main())
load_cases()
