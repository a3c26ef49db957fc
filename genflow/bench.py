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

Entry points: ``add_arguments(parser)`` and ``run(args) -> int`` (the CLI's ``genflow bench``)
and ``main(argv=None)`` (``python -m genflow.bench``).
"""
from __future__ import annotations

import argparse
import datetime
import gc
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
from typing import Callable, Iterable, Iterator, List, Optional

import torch

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
class Row:
    group: str
    case: str
    size: str
    baseline: str
    kind: str
    status: str
    genflow_ms: Optional[float] = None
    baseline_ms: Optional[float] = None
    ratio: Optional[float] = None
    max_err: Optional[float] = None
    rel_err: Optional[float] = None
    tol: Optional[float] = None
    check: str = ""
    nfe_genflow: Optional[int] = None
    nfe_baseline: Optional[int] = None
    err_genflow: Optional[float] = None
    err_baseline: Optional[float] = None
    bytes: Optional[int] = None
    note: str = ""

    @property
    def ahead(self) -> str:
        """"yes" / "NO" for peers (ratio > 1: genflow faster), "-" for floors and untimed rows."""
        if self.kind != "peer" or self.ratio is None:
            return "-"
        return "yes" if self.ratio > 1.0 else "NO"

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["genflow_ahead"] = self.ahead
        return d


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
        log(_line(row))
    return rows


# ---------------------------------------------------------------- formatting

def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _fmt_err(row: Row):
    if row.rel_err is None:
        return "-"
    return f"{row.rel_err:.1e}"


def _fmt_nfe(row: Row):
    if row.nfe_genflow is None and row.nfe_baseline is None:
        return "-"
    return f"{row.nfe_genflow if row.nfe_genflow is not None else '-'}/{row.nfe_baseline if row.nfe_baseline is not None else '-'}"


def _fmt_ratio(row: Row):
    return "-" if row.ratio is None else f"{row.ratio:.2f}"


def _notes(row: Row) -> str:
    parts = []
    if row.status != "ok":
        parts.append(row.status)
    if row.err_genflow is not None or row.err_baseline is not None:
        parts.append(f"error vs reference: genflow {row.err_genflow:.1e}, {row.baseline} {row.err_baseline:.1e}")
    if row.note:
        parts.append(row.note)
    if row.bytes and row.baseline_ms:
        parts.append(f"{row.bytes / (row.baseline_ms * 1e-3) / 1e9:.1f} GB/s")
    return "; ".join(parts)


COLUMNS = [("case", 31, "<"), ("size", 11, "<"), ("vs", 29, "<"), ("genflow ms", 11, ">"), ("vs ms", 11, ">"),
           ("ratio", 7, ">"), ("ahead", 6, ">"), ("rel err", 8, ">"), ("NFE gf/vs", 10, ">")]


HEADER = " ".join(f"{n:{a}{w}}" for n, w, a in COLUMNS) + "  notes"


def _cells(row: Row) -> list:
    return [row.case, row.size, row.baseline, _fmt_ms(row.genflow_ms), _fmt_ms(row.baseline_ms), _fmt_ratio(row),
            row.ahead, _fmt_err(row), _fmt_nfe(row)]


def _line(row: Row) -> str:
    out = " ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(_cells(row), COLUMNS))
    notes = _notes(row)
    return out + (f"  {notes}" if notes else "")


def format_table(rows: List[Row]) -> str:
    """The console table, one block per group."""
    header = HEADER
    lines = []
    for name, grp_rows in itertools.groupby(rows, key=lambda r: r.group):
        lines.append(f"\n== {name}: {GROUPS[name].title if name in GROUPS else ''}")
        lines.append(header)
        lines.append("-" * len(header))
        lines.extend(_line(r) for r in grp_rows)
    return "\n".join(lines)


def markdown_table(rows: List[Row]) -> str:
    head = ["case", "size", "vs", "genflow ms", "vs ms", "ratio (vs / genflow)", "genflow ahead", "rel err",
            "NFE gf/vs", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = _cells(r)
        if r.ahead == "NO":
            cells[6] = "**NO**"
        cells.append(_notes(r).replace("|", "/"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
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


# ================================================================ the row groups
# Each builder yields Cases lazily, so one case's tensors are freed before the next is built.

C0, C1, C2, S = 0.95, 0.03, -0.01, 0.2


def _noise_law(out: torch.Tensor, det: torch.Tensor, scale: float, inputs) -> float:
    """How far ``z = (out - det) / scale`` is from i.i.d. N(0, 1) independent of ``inputs``: the
    largest of |mean|, |std - 1| and |corr(z, input)|, each in units of its standard error."""
    z = ((out.double() - det.double()) / scale).flatten().cpu()
    n = z.numel()
    se = 1.0 / math.sqrt(n)
    worst = max(abs(z.mean().item()) / se, abs(z.std().item() - 1.0) / (se * math.sqrt(0.5)))
    for v in inputs:
        v = v.double().flatten().cpu()
        corr = ((z - z.mean()) * (v - v.mean())).mean().item() / (z.std().item() * v.std().item())
        worst = max(worst, abs(corr) / se)
    return worst


def _op_sizes(ctx):
    if ctx.tiny:
        return [4096]
    if ctx.quick:
        return [100_000, 4_000_000]
    return [1_000, 100_000, 1_000_000, 12_582_912]


@group("ops", "one fused solver step vs eager PyTorch, torch.compile and the bandwidth floor")
def _ops(ctx: Context) -> Iterator[Case]:
    """Euler–Maruyama-like step ``x <- c0 x + c1 d + s z`` (reads x and the model output d, writes x,
    noise made in the kernel: 12 bytes/element in float32) and a DPM-Solver++(2M) step
    ``x <- c0 x + c1 d + c2 d_prev`` (16 bytes/element). genflow runs in place (``out=x``); eager
    and torch.compile evaluate the same expression (a fresh output; ``torch.randn_like`` for z). The
    floor is one device copy moving the same bytes (read + write), timed in the same run. On a CPU
    a copy also reads its destination (write-allocate) while the in-place step writes lines it has
    just read, so an in-place step can come out slightly under that floor (ratio a little > 1)."""
    from genflow.ops import fused_update

    for kind in ("em_step", "dpmpp_2m_step"):
        for n in _op_sizes(ctx):
            yield _op_case(ctx, kind, n, fused_update)
    for n in _op_sizes(ctx):
        yield _langevin_case(ctx, n)


def _langevin_case(ctx, n, batch=16):
    """The Langevin corrector step (Song et al. 2021, Alg. 5) on ``batch`` samples of ``n/batch``
    elements with supplied noise: per-sample ``eps_b = 2 (snr ||z_b|| / ||s_b||)^2`` and
    ``x <- x + eps s + sqrt(2 eps) z`` (s the model output). genflow: ``langevin_update`` (two
    passes); eager and torch.compile: norms then update. Floor: read x, s, z and write x
    (16 bytes/element) — the second pass over x, s, z is what the fused op pays beyond it."""
    from genflow.ops import langevin_update

    shape = (batch, max(1, n // batch))
    x, s, z = (ctx.randn(*shape, seed=10 + i) for i in range(3))
    x0 = x.clone()
    snr = 0.16

    def expr(x, s, z):
        ratio = snr * z.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)
        eps = (2 * ratio * ratio).reshape(-1, 1)
        return x + eps * s + torch.sqrt(2 * eps) * z

    def genflow():
        return langevin_update(x, s, snr=snr, noise=z, out=x)

    ref = langevin_update(x0, s, snr=snr, noise=z)
    holder = {}

    def setup_compile():
        started = time.perf_counter()
        holder["fn"] = torch.compile(expr, dynamic=False, fullgraph=True)
        holder["fn"](x0, s, z)
        return f"compile {time.perf_counter() - started:.1f} s"

    src = torch.ones(2 * x.numel(), dtype=ctx.dtype, device=ctx.device)
    dst = torch.empty_like(src)
    bytes_moved = int(2 * src.element_size() * src.numel())
    size = f"{x.numel():.3g}".replace("e+0", "e").replace("e+", "e")
    return Case("langevin_step", f"{size} f32", genflow, [
        Baseline("eager", lambda: expr(x0, s, z), lambda: agree(ref, expr(x0, s, z), 1e-5)),
        Baseline("torch.compile", lambda: holder["fn"](x0, s, z), lambda: agree(ref, holder["fn"](x0, s, z), 1e-5),
                 setup=setup_compile) if ctx.compile else Baseline("torch.compile", None, status="skipped: --no-compile"),
        Baseline("floor (device copy)", lambda: dst.copy_(src), kind="floor", bytes=bytes_moved,
                 note=f"{bytes_moved / x.numel():.0f} B/element"),
    ])


def _op_case(ctx, kind, n, fused_update):
    x, d, dp, z = (ctx.randn(n, seed=i) for i in range(4))
    x0 = x.clone()
    offsets = itertools.count(1)
    elems = 1.5 if kind == "em_step" else 2.0  # bytes moved / (8 bytes per copied element)
    src = torch.ones(int(elems * n), dtype=ctx.dtype, device=ctx.device)
    dst = torch.empty_like(src)
    bytes_moved = int(2 * src.element_size() * src.numel())
    if kind == "em_step":
        def genflow():
            return fused_update(x, [d], [C0, C1], S, seed=1, offset=next(offsets), out=x)

        def expr(x, d):
            return C0 * x + C1 * d + S * torch.randn_like(x)

        det = C0 * x0 + C1 * d

        def check_eager():
            ours = fused_update(x0, [d], [C0, C1], S, noise=z)
            return agree(ours, C0 * x0 + C1 * d + S * z, 1e-5, how="same supplied noise z")

        def check_law(fn):
            def check():
                worst = max(_noise_law(fused_update(x0, [d], [C0, C1], S, seed=7, offset=1), det, S, [x0, d]),
                            _noise_law(fn(x0, d), det, S, [x0, d]))
                return Agreement(worst, 1.0, 6.0, extra={"law": True}, how="noise law: (out - c0 x - c1 d)/s is N(0,1), uncorrelated "
                                 "with x and d, for both (max |mean|, |std-1|, |corr| in standard errors, tol 6)")
            return check
    else:
        def genflow():
            return fused_update(x, [d, dp], [C0, C1, C2], out=x)

        def expr(x, d, dp):
            return C0 * x + C1 * d + C2 * dp

        ref = fused_update(x0, [d, dp], [C0, C1, C2])
        check_eager = lambda: agree(ref, expr(x0, d, dp), 1e-5)  # noqa: E731
        check_law = None

    args = (x0, d) if kind == "em_step" else (x0, d, dp)
    holder = {}

    def setup_compile():
        started = time.perf_counter()
        holder["fn"] = torch.compile(expr, dynamic=False, fullgraph=True)
        holder["fn"](*args)
        return f"compile {time.perf_counter() - started:.1f} s"

    compiled_fn = lambda: holder["fn"](*args)  # noqa: E731
    if kind == "em_step":
        check_compile = lambda: check_law(holder["fn"])()  # noqa: E731
    else:
        check_compile = lambda: agree(ref, holder["fn"](*args), 1e-5)  # noqa: E731
    size = f"{n:.3g}".replace("e+0", "e").replace("e+", "e")
    note = ""
    if ctx.device == "cuda":
        from genflow._extension import has_cuda_kernels
        if not has_cuda_kernels():
            note = "genflow CUDA kernels not built: PyTorch reference"
    copy = lambda: dst.copy_(src)  # noqa: E731
    return Case(kind, f"{size} f32", genflow, [
        Baseline("eager", lambda: expr(*args), check_eager),
        Baseline("torch.compile", compiled_fn, check_compile, setup=setup_compile) if ctx.compile else
        Baseline("torch.compile", None, status="skipped: --no-compile"),
        Baseline("floor (device copy)", copy, kind="floor", bytes=bytes_moved,
                 note=f"{bytes_moved / n:.0f} B/element"),
    ], note=note)


# ---------------------------------------------------------------- full solves: shared pieces

def _solve_shapes(ctx, kind, adaptive=False):
    if ctx.tiny:
        return [(1, 2), (64, 2)]
    return [(1, 2), (_large(ctx, kind, adaptive), 2)]


class MLP:
    """A small fixed network ``net(x, t)``: ``[x, log1p(t)] -> 64 -> 64 -> D`` with SiLU, random
    weights from a fixed seed (float32 and float64 copies), no autograd. It stands for a real
    denoiser in the "mlp" rows; ``scale_in`` divides x by ``sqrt(1 + t^2)`` (EDM-style input scaling)."""

    def __init__(self, dim: int = 2, hidden: int = 64, *, seed: int = 0, scale_in: bool = False):
        g = torch.Generator().manual_seed(seed)
        sizes = [dim + 1, hidden, hidden, dim]
        self.weights = {torch.float64: [(torch.randn(a, b, generator=g, dtype=torch.float64) / math.sqrt(a),
                                         0.1 * torch.randn(b, generator=g, dtype=torch.float64))
                                        for a, b in zip(sizes[:-1], sizes[1:])]}
        self.scale_in = scale_in
        self.dim = dim

    def _params(self, dtype, device):
        key = (dtype, torch.device(device))
        if key not in self.weights:
            self.weights[key] = [(w.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device))
                                 for w, b in self.weights[torch.float64]]
        return self.weights[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1, 1)
        if self.scale_in:
            x = x / torch.sqrt(1 + t * t)
        h = torch.cat([x, torch.log1p(t).expand(x.shape[0], 1)], dim=1)
        layers = self._params(x.dtype, x.device)
        for k, (w, b) in enumerate(layers):
            h = torch.addmm(b, h, w)
            if k < len(layers) - 1:
                h = torch.nn.functional.silu(h)
        return h


MODELS = ("free", "mlp")


def _net(kind: str, *, scale_in: bool = False):
    """``net(x, t)``: ``0.5 x`` ("free": the overhead rows) or the small MLP ("mlp")."""
    if kind == "free":
        return lambda x, t: 0.5 * x
    return MLP(scale_in=scale_in)


def _large(ctx, kind, adaptive=False):
    """The large batch: 65536 (8192 with --quick for the MLP and for adaptive solvers)."""
    return 8192 if (ctx.quick and (kind != "free" or adaptive)) else 65536


def _size(shape):
    return str(tuple(shape)).replace(" ", "")


def _missing(name, case, size, peer):
    return Case(case, size, lambda: None, [Baseline(peer, None, status=f"skipped: {name} not installed")])


class DeepMLP:
    """A 3-hidden-layer MLP denoiser ``net(x, sigma) -> x0`` (256 wide, SiLU, EDM input scaling
    ``x / sqrt(1 + sigma^2)``), fixed random weights, no autograd: the "mlp256" rows."""

    def __init__(self, dim: int = 2, hidden: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        sizes = [dim + 1, hidden, hidden, hidden, dim]
        self.layers = [(torch.randn(a, b, generator=g) / math.sqrt(a), 0.1 * torch.randn(b, generator=g))
                       for a, b in zip(sizes[:-1], sizes[1:])]
        self._on = {}

    def __call__(self, x, sigma):
        key = (x.dtype, x.device)
        if key not in self._on:
            self._on[key] = [(w.to(x), b.to(x)) for w, b in self.layers]
        s = sigma.to(x.dtype).reshape(-1, 1)
        h = torch.cat([x * torch.rsqrt(1 + s * s), torch.log(s) / 4], dim=1)
        layers = self._on[key]
        for k, (w, b) in enumerate(layers):
            h = torch.addmm(b, h, w)
            if k < len(layers) - 1:
                h = torch.nn.functional.silu(h)
        return h


class ConvNet:
    """A 3-layer 3x3 convolutional denoiser ``net(x, sigma) -> x0`` on [B, C, H, W] (64 channels,
    SiLU, EDM input scaling), fixed random weights, no autograd: the "conv" rows."""

    def __init__(self, channels: int = 4, hidden: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        sizes = [channels, hidden, hidden, channels]
        self.layers = [(torch.randn(b, a, 3, 3, generator=g) / math.sqrt(9 * a), 0.1 * torch.randn(b, generator=g))
                       for a, b in zip(sizes[:-1], sizes[1:])]
        self._on = {}

    def __call__(self, x, sigma):
        key = (x.dtype, x.device)
        if key not in self._on:
            self._on[key] = [(w.to(x), b.to(x)) for w, b in self.layers]
        h = x * torch.rsqrt(1 + sigma.to(x.dtype) ** 2).reshape(-1, 1, 1, 1)
        layers = self._on[key]
        for k, (w, b) in enumerate(layers):
            h = torch.nn.functional.conv2d(h, w, b, padding=1)
            if k < len(layers) - 1:
                h = torch.nn.functional.silu(h)
        return h


@group("model", "20-step dpmpp_2m solves with real denoisers vs k-diffusion and the model's own 20 evaluations")
def _model_bound(ctx: Context) -> Iterator[Case]:
    """Where the model dominates, a solver's own cost should vanish: genflow's solve against
    k-diffusion's ``sample_dpmpp_2m`` on the same EDM problem and against the model's 20
    evaluations alone (a "bound" row: ratio = model time / genflow time, 1.0 = no solver
    overhead left). On CUDA a second genflow case replays the solve as a CUDA graph
    (``cuda_graph=True``)."""
    import genflow as gf
    from genflow import _peers

    K = _peers.k_diffusion_sampling()
    steps = 5 if ctx.tiny else 20
    if ctx.tiny:
        cases = [("mlp256", DeepMLP(), (1, 2)), ("conv", ConvNet(), (1, 4, 8, 8))]
    elif ctx.quick:
        cases = [("mlp256", DeepMLP(), (1, 2)), ("mlp256", DeepMLP(), (8192, 2)), ("conv", ConvNet(), (4, 4, 32, 32))]
    else:
        cases = [("mlp256", DeepMLP(), (1, 2)), ("mlp256", DeepMLP(), (65536, 2)), ("conv", ConvNet(), (16, 4, 64, 64))]
    graphs = [False, True] if ctx.device == "cuda" else [False]
    for net_name, net, shape in cases:
        process = gf.EDM(sigma_min=0.002, sigma_max=80.0)
        sigmas = (K.get_sigmas_karras(steps, 0.002, 80.0) if K is not None else
                  torch.cat([gf.time_grid(process, steps, "karras"), torch.zeros(1)])).double()
        x_T = 80.0 * ctx.randn(*shape, seed=5)
        svec = [torch.full((shape[0],), float(v), dtype=ctx.dtype, device=ctx.device) for v in sigmas[:-1]]

        def model_alone(net=net, x_T=x_T, svec=svec):
            for s in svec:
                out = net(x_T, s)
            return out

        for graph in graphs:
            def make_gf(net, process=process, sigmas=sigmas, x_T=x_T, graph=graph):
                model = gf.Model(net, process, "x0")
                return lambda: gf.sample(model, x_T=x_T, solver="dpmpp_2m", schedule=sigmas, lower_order_final=False,
                                         cuda_graph=graph)

            case = f"dpmpp_2m {steps} steps, {net_name}" + (", cuda graph" if graph else "")
            if K is None:
                peer = Baseline("k-diffusion sample_dpmpp_2m", None, status="skipped: k-diffusion not installed")
            else:
                def make_peer(net, sigmas=sigmas.to(ctx.device), x_T=x_T):
                    return lambda: K.sample_dpmpp_2m(net, x_T, sigmas, disable=True)
                peer = Baseline("k-diffusion sample_dpmpp_2m", make_peer(net), _equal_work(make_gf, make_peer, net, 1e-4))
            yield Case(case, _size(shape), make_gf(net), [
                peer, Baseline(f"model alone ({steps} evaluations)", model_alone, kind="bound")])


@group("k-diffusion", "full solves vs k-diffusion 0.1.1 (EDM, its Karras sigmas with the final 0)")
def _k_diffusion(ctx: Context) -> Iterator[Case]:
    """genflow and k-diffusion integrate the same EDM problem on k-diffusion's own Karras grid (the
    same sigmas tensor, ending at 0) with the same denoiser ``net(x, sigma) -> x0``; float32."""
    import genflow as gf
    from genflow import _peers

    K = _peers.k_diffusion_sampling()
    steps = 10 if ctx.tiny else 20
    solvers = [("euler", "sample_euler", {}), ("heun", "sample_heun", {}),
               ("dpmpp_2m", "sample_dpmpp_2m", {"lower_order_final": False})]
    for model_name in MODELS:
        for shape in _solve_shapes(ctx, model_name):
            for solver, peer, options in solvers:
                case, size = f"{solver} {steps} steps, {model_name}", _size(shape)
                if K is None:
                    yield _missing("k-diffusion", case, size, f"k-diffusion {peer}")
                    continue
                process = gf.EDM(sigma_min=0.002, sigma_max=80.0)
                sigmas = K.get_sigmas_karras(steps, 0.002, 80.0).double()  # genflow: host grid
                net = _net(model_name, scale_in=True)
                x_T = 80.0 * ctx.randn(*shape, seed=1)

                def make_gf(net, solver=solver, options=options, process=process, sigmas=sigmas, x_T=x_T):
                    model = gf.Model(net, process, "x0")
                    return lambda: gf.sample(model, x_T=x_T, solver=solver, schedule=sigmas, **options)

                def make_peer(net, peer=peer, sigmas=sigmas.to(ctx.device), x_T=x_T):
                    sampler = getattr(K, peer)
                    return lambda: sampler(net, x_T, sigmas, disable=True)

                yield Case(case, size, make_gf(net), [
                    Baseline(f"k-diffusion {peer}", make_peer(net), _equal_work(make_gf, make_peer, net, 1e-4))])


def _equal_work(make_gf, make_peer, net, tol, reference=None, *, how=None):
    """The agreement check of a solve: both on the same inputs with counting nets (NFE). With a
    ``reference`` solution (different methods of equal order, adaptive methods) the outputs must
    agree to within the sum of their errors against it plus ``tol``, and each error must stay
    below 5% of the solution's scale (both solve the same problem)."""
    def check():
        ours_net, peer_net = Counted(net), Counted(net)
        ours = make_gf(ours_net)()
        theirs = make_peer(peer_net)()
        extra = {"nfe_genflow": ours_net.calls, "nfe_peer": peer_net.calls}
        if reference is None:
            return agree(ours, theirs, tol, **extra)
        ref = reference().to(ours.device)
        e_ours = (ours.double() - ref).abs().max().item()
        e_peer = (theirs.double() - ref).abs().max().item()
        extra.update(err_genflow=e_ours, err_peer=e_peer)
        a = agree(ours, theirs, tol, **extra)
        bound = (e_ours + e_peer) / a.scale + tol
        a.tol = bound if max(e_ours, e_peer) <= 0.05 * a.scale else 0.0
        a.how = how or ("max |genflow - peer| <= (their errors vs a float64 reference) + tol, relative to max |peer|; "
                        "each error < 5% of it")
        return a
    return check


@group("diffusers", "full solves vs diffusers 0.42 schedulers (the standard set_timesteps / step loop)")
def _diffusers(ctx: Context) -> Iterator[Case]:
    """DPMSolverMultistepScheduler (dpmsolver++, order 2): VP process, eps network, genflow's
    log-SNR grid ending at sigma = 0 written into the scheduler's sigma table (the way the
    peer-equality tests run it). EulerDiscreteScheduler: genflow's euler on the scheduler's own
    sigmas as an EDM problem in diffusers' variables ``(y, s)`` (k-diffusion's view of a DDPM
    network). Both sides call the same network once per step; float32."""
    import genflow as gf
    from genflow import _peers

    D = _peers.optional("diffusers")
    steps = 10 if ctx.tiny else 20
    for model_name in MODELS:
        for shape in _solve_shapes(ctx, model_name):
            size = _size(shape)
            for solver in ("dpmpp_2m", "euler"):
                peer = "DPMSolverMultistep" if solver == "dpmpp_2m" else "EulerDiscrete"
                case = f"{solver} {steps} steps, {model_name}"
                if D is None:
                    yield _missing("diffusers", case, size, f"diffusers {peer}")
                elif solver == "dpmpp_2m":
                    yield _diffusers_dpm(ctx, gf, D, model_name, shape, steps, case, size)
                else:
                    yield _diffusers_euler(ctx, gf, D, model_name, shape, steps, case, size)


def _diffusers_dpm(ctx, gf, D, model_name, shape, steps, case, size):
    process = gf.VP()
    ts = gf.time_grid(process, steps - 1, "logsnr")
    ts = torch.cat([ts, ts.new_zeros(1)])
    net = _net(model_name)  # predicts eps
    x_T = ctx.randn(*shape, seed=2)
    sig = (process.sigma(ts) / process.alpha(ts)).float().to(ctx.device)
    times = [torch.full((shape[0],), float(t), dtype=ctx.dtype, device=ctx.device) for t in ts[:-1]]
    scheduler = D.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)

    def make_gf(net):
        model = gf.Model(net, process, "eps")
        return lambda: gf.sample(model, x_T=x_T, solver="dpmpp_2m", schedule=ts)

    def make_peer(net):
        def loop():
            scheduler.set_timesteps(steps, device=ctx.device)
            scheduler.sigmas = sig
            x = x_T
            for j, timestep in enumerate(scheduler.timesteps):
                eps = net(scheduler.scale_model_input(x, timestep), times[j])
                x = scheduler.step(eps, timestep, x, return_dict=False)[0]
            return x
        return loop

    return Case(case, size, make_gf(net), [
        Baseline("diffusers DPMSolverMultistep", make_peer(net), _equal_work(make_gf, make_peer, net, 1e-4))])


def _diffusers_euler(ctx, gf, D, model_name, shape, steps, case, size):
    scheduler = D.EulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    process = gf.EDM(sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]))
    grid = sigmas  # genflow's grid stays on the host (its coefficients are host float64)
    nd = len(shape) - 1
    net = _net(model_name)  # eps of the scaled input x_in = y / sqrt(1 + s^2) at s
    y_T = float(scheduler.init_noise_sigma) * ctx.randn(*shape, seed=3)
    svec = [torch.full((shape[0],), float(s), dtype=ctx.dtype, device=ctx.device) for s in sigmas[:-1]]

    def make_gf(net):
        def view(y, s):  # the EDM model in (y, s): the network sees y / sqrt(1 + s^2), as in diffusers
            # (one shared sigma per step on this grid: scale by it once, as diffusers' loop does)
            return net(y * torch.rsqrt(1 + s[:1] * s[:1]).reshape((1,) * (nd + 1)), s)
        model = gf.Model(view, process, "eps")
        return lambda: gf.sample(model, x_T=y_T, solver="euler", schedule=grid)

    def make_peer(net):
        def loop():
            scheduler.set_timesteps(steps, device=ctx.device)
            x = y_T
            for j, timestep in enumerate(scheduler.timesteps):
                eps = net(scheduler.scale_model_input(x, timestep), svec[j])
                x = scheduler.step(eps, timestep, x, return_dict=False)[0]
            return x
        return loop

    return Case(case, size, make_gf(net), [
        Baseline("diffusers EulerDiscrete", make_peer(net), _equal_work(make_gf, make_peer, net, 1e-4))])


def _velocity_fn(model, batch, device, dtype):
    """torchdiffeq's ``func(t, y)``: the probability-flow velocity with one network call and the
    conversion coefficients as Python floats (what a careful user writes)."""
    def func(t, y):
        tf = float(t)
        a, b = model.coefficients("velocity", tf)
        return a * y + b * model.net(y, torch.full((batch,), tf, dtype=dtype, device=device))
    return func


def _cache(fn):
    memo = []

    def cached():
        if not memo:
            memo.append(fn())
        return memo[0]
    return cached


@group("torchdiffeq", "probability-flow ODE solves vs torchdiffeq 0.2.5 odeint (NFE and error too)")
def _torchdiffeq(ctx: Context) -> Iterator[Case]:
    """VP process, x0 network, the probability-flow ODE from T = 1 to t_min. Fixed steps: genflow
    ``rk4`` vs odeint ``rk4`` on genflow's log-SNR grid (torchdiffeq's RK4 is the 3/8-rule variant,
    genflow's the classic one: equal order and NFE, so the outputs agree to the discretisation
    error, not to rounding). Adaptive: genflow ``rk45`` vs odeint ``dopri5`` at rtol = atol = 1e-5
    (genflow controls the step per sample, torchdiffeq per batch). The large batch is 8192 with
    --quick. Errors are against a float64
    dopri5 solution at rtol = atol = 1e-9. dopri5 gets ``step_t`` = the end points: without it,
    torchdiffeq steps past t_min and interpolates back, evaluating the model at t < 0."""
    import genflow as gf
    from genflow import _peers

    tde = _peers.optional("torchdiffeq")
    steps = 10 if ctx.tiny else 20
    tol = 1e-5
    for model_name in MODELS:
        for shape in _solve_shapes(ctx, model_name, adaptive=True):
            size = _size(shape)
            for method in ("rk4", "dopri5"):
                solver = "rk4" if method == "rk4" else "rk45"
                case = f"rk4 {steps} steps, {model_name}" if method == "rk4" else f"rk45 tol {tol:g}, {model_name}"
                if tde is None:
                    yield _missing("torchdiffeq", case, size, f"torchdiffeq {method}")
                    continue
                process = gf.VP()
                net = _net(model_name)
                ts = gf.time_grid(process, steps, "logsnr")
                span = torch.tensor([process.T, process.t_min], dtype=torch.float64, device=ctx.device)
                x_T = ctx.randn(*shape, seed=4)

                def make_gf(net, solver=solver, ts=ts, x_T=x_T, process=process):
                    model = gf.Model(net, process, "x0")
                    if solver == "rk4":
                        return lambda: gf.sample(model, x_T=x_T, solver="rk4", schedule=ts)
                    return lambda: gf.sample(model, x_T=x_T, solver="rk45", rtol=tol, atol=tol)

                def make_peer(net, method=method, ts=ts, x_T=x_T, process=process, span=span):
                    func = _velocity_fn(gf.Model(net, process, "x0"), x_T.shape[0], x_T.device, x_T.dtype)
                    if method == "rk4":
                        grid = ts.to(dtype=x_T.dtype, device=x_T.device)
                        return lambda: tde.odeint(func, x_T, grid, method="rk4")[-1]
                    grid = span.to(x_T.dtype)
                    return lambda: tde.odeint(func, x_T, grid, method="dopri5", rtol=tol, atol=tol,
                                             options={"step_t": grid})[-1]

                def reference(net=net, x_T=x_T, process=process, span=span):
                    x64 = x_T.double()
                    func = _velocity_fn(gf.Model(net, process, "x0"), x64.shape[0], x64.device, x64.dtype)
                    return tde.odeint(func, x64, span, method="dopri5", rtol=1e-9, atol=1e-9,
                                      options={"step_t": span})[-1]

                yield Case(case, size, make_gf(net), [
                    Baseline(f"torchdiffeq {method}", make_peer(net),
                             _equal_work(make_gf, make_peer, net, 1e-4, reference=_cache(reference)))])


class _ReverseSDE(torch.nn.Module):
    """The reverse SDE of a model in torchsde's forward time ``s = T - t`` (Ito, diagonal noise):
    ``dx = -[f x - g2 score(x, t)] ds + sqrt(g2) dW``, one network call per drift."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, model, batch, device, dtype):
        super().__init__()
        self.model, self.batch, self.device, self.dtype = model, batch, device, dtype
        self.T = float(model.process.T)

    def f(self, s, y):
        t = self.T - float(s)
        p = self.model.process
        a, b = self.model.coefficients("score", t)
        g2, f = float(p.g2(t)), float(p.f(t))
        out = self.model.net(y, torch.full((self.batch,), t, dtype=self.dtype, device=self.device))
        return (g2 * a - f) * y + (g2 * b) * out

    def g(self, s, y):
        return y.new_full((1, 1), math.sqrt(float(self.model.process.g2(self.T - float(s))))).expand_as(y)


def _increments_brownian(torchsde, dws):
    """A torchsde Brownian motion handing out the given increments in order (the agreement check)."""
    class Increments(torchsde.BaseBrownian):
        def __init__(self):
            self.i = 0

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            dw = dws[self.i]
            self.i += 1
            return dw

        def __repr__(self):
            return "Increments()"

        dtype = property(lambda self: dws[0].dtype)
        device = property(lambda self: dws[0].device)
        shape = property(lambda self: tuple(dws[0].shape))
        levy_area_approximation = property(lambda self: "none")

    return Increments()


@group("torchsde", "reverse-SDE solves vs torchsde 0.2.6 sdeint (Euler-Maruyama, equal steps)")
def _torchsde(ctx: Context) -> Iterator[Case]:
    """VP reverse SDE (eta = 1), x0 network, from T = 1 to t_min on a uniform grid: genflow
    ``euler_maruyama`` (in-kernel Philox noise) vs ``sdeint(method="euler")`` (its default
    BrownianInterval, built per solve as usual) at equal steps. Agreement is checked once with the
    same Brownian increments fed to both. torchsde evaluates the drift once more than it steps
    (its shape check at the start)."""
    import genflow as gf
    from genflow import _peers

    tsde = _peers.optional("torchsde")
    steps = 10 if ctx.tiny else (50 if ctx.quick else 100)
    for model_name in MODELS:
        for shape in _solve_shapes(ctx, model_name):
            size = _size(shape)
            case = f"euler_maruyama {steps} steps, {model_name}"
            if tsde is None:
                yield _missing("torchsde", case, size, "torchsde euler")
                continue
            process = gf.VP()
            net = _net(model_name)
            ts = gf.time_grid(process, steps, "uniform")
            span = float(process.T - process.t_min)
            dt = span / steps * (1 + 1e-6)  # exactly `steps` steps (the last one clipped to the end)
            s_span = torch.tensor([0.0, span], dtype=ctx.dtype, device=ctx.device)
            x_T = ctx.randn(*shape, seed=5)
            g = torch.Generator().manual_seed(6)
            zs = [torch.randn(shape, generator=g, dtype=ctx.dtype).to(ctx.device) for _ in range(steps)]

            def make_gf(net, ts=ts, x_T=x_T, process=process, noise=None):
                model = gf.Model(net, process, "x0")
                if noise is None:
                    return lambda: gf.sample(model, x_T=x_T, solver="euler_maruyama", schedule=ts, generator=0)
                it = iter(noise)
                return lambda: gf.sample(model, x_T=x_T, solver="euler_maruyama", schedule=ts,
                                         noise_sampler=lambda a, b: next(it))

            def make_peer(net, x_T=x_T, process=process, s_span=s_span, dt=dt, bm=None):
                sde = _ReverseSDE(gf.Model(net, process, "x0"), x_T.shape[0], x_T.device, x_T.dtype)
                return lambda: tsde.sdeint(sde, x_T, s_span, method="euler", dt=dt, bm=bm)[-1]

            def check(net=net, make_gf=make_gf, make_peer=make_peer, zs=zs, dt=dt):
                ours_net, peer_net = Counted(net), Counted(net)
                ours = make_gf(ours_net, noise=zs)()
                dws = [z * math.sqrt(dt) for z in zs]
                bm = _increments_brownian(tsde, dws)
                theirs = make_peer(peer_net, bm=bm)()
                if bm.i != len(dws):
                    raise RuntimeError(f"torchsde took {bm.i} steps, expected {len(dws)}")
                a = agree(ours, theirs, 1e-4, nfe_genflow=ours_net.calls, nfe_peer=peer_net.calls)
                a.how = "same Brownian increments; " + a.how
                return a

            yield Case(case, size, make_gf(net), [Baseline("torchsde euler", make_peer(net), check)])



# ---------------------------------------------------------------- likelihood

def _std_normal_logp(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample (the prior of LinearPath at T = 1), in z's dtype."""
    flat = z.flatten(1)
    return -0.5 * flat.square().sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def _score_sde_likelihood(model, x, *, rtol, atol, method="RK45", dtype=torch.float32):
    """score_sde's ``likelihood.py`` approach, re-implemented from its description: the batch's
    ``[x, delta]`` flattened into one float64 numpy vector and integrated from ``t_min`` to ``T``
    by ``scipy.integrate.solve_ivp`` (one step size for the whole batch), every right-hand side
    converting numpy -> torch (``dtype``, the model's device), evaluating the drift and its
    divergence and converting back. The divergence is the exact trace (one backward pass per
    dimension) in place of score_sde's Hutchinson estimate, so both sides do equal work."""
    import numpy as np
    from scipy import integrate

    shape, device = tuple(x.shape), x.device
    batch, dim = shape[0], int(x[0].numel())
    process = model.process

    def rhs(t, y):
        with torch.enable_grad():
            xs = torch.from_numpy(y[:-batch]).reshape(shape).to(device=device, dtype=dtype).requires_grad_(True)
            v = model.velocity(xs, torch.full((batch,), float(t), dtype=dtype, device=device))
            flat = v.reshape(batch, dim)
            div = 0.0
            for i in range(dim):
                (g,) = torch.autograd.grad(flat[:, i].sum(), xs, retain_graph=i + 1 < dim)
                div = div + g.reshape(batch, dim)[:, i]
        return np.concatenate([v.detach().reshape(-1).cpu().double().numpy(), div.detach().cpu().double().numpy()])

    init = np.concatenate([x.detach().reshape(-1).cpu().double().numpy(), np.zeros(batch)])
    sol = integrate.solve_ivp(rhs, (float(process.t_min), float(process.T)), init, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    y_T = torch.from_numpy(sol.y[:, -1])
    z = y_T[:-batch].reshape(shape)
    return process.prior_log_prob(z) + y_T[-batch:]


def _likelihood_shape(ctx):
    return (64, 2) if ctx.tiny else (1024, 2)


def _divergence_batch(ctx):
    return 64 if ctx.tiny else (1024 if ctx.quick else 4096)


@group("likelihood", "PF-ODE log-likelihoods vs score_sde-style scipy RK45 and flow_matching 1.0.10; "
                     "one Hutchinson divergence estimate vs a forward pass")
def _likelihood(ctx: Context) -> Iterator[Case]:
    """(1) ``gf.log_likelihood(method="exact", rtol = atol = 1e-5)`` (eager; and with
    ``compile=True`` unless --no-compile) of 1024 2D points (64 with
    --tiny) under a flow-matching velocity MLP (``LinearPath``, prediction "velocity", the fixed
    random ``MLP``): against score_sde's approach (``_score_sde_likelihood``: scipy ``solve_ivp``
    RK45 over the whole batch with numpy round trips) and against flow_matching's
    ``ODESolver.compute_likelihood(method="dopri5", exact_divergence=True)`` (torchdiffeq; its
    data is at t = 1, so it sees ``u(x, s) = -v(x, 1 - s)`` and integrates s from 1 to 0). All
    three use the exact divergence and the same tolerances, float32 model evaluations. Agreement:
    the log-likelihoods agree to within the sum of their errors against a float64 reference
    (scipy DOP853 at rtol = atol = 1e-10) plus 1e-4 relative.

    (2) One Hutchinson divergence estimate ``eps^T (dv/dx) eps`` (Rademacher probe fixed) through
    a 3-layer MLP (``MLP(hidden=512)``: 3 -> 512 -> 512 -> 2), batch 4096 (1024 with --quick):
    genflow's estimator step (``log_likelihood``'s drift: one forward, one VJP, ``probe_dot``)
    against ``torch.func.vjp`` doing the same estimate the plain way (a peer, same probe) and
    against one forward pass (a bound: ratio = forward ms / estimate ms, so 1/ratio is the
    estimate's cost in forward passes; the issue's GPU target is <= 2.5 forwards, ratio >= 0.4)."""
    import genflow as gf
    from genflow import _peers
    from genflow.likelihood import _Drift
    from genflow.ops import hutchinson

    fm = _peers.optional("flow_matching")
    if fm is not None:
        from flow_matching.solver import ODESolver
    tol = 1e-5
    shape = _likelihood_shape(ctx)
    size = _size(shape)
    case = f"pf-ode logp, mlp, tol {tol:g}"
    process = gf.LinearPath()
    net = MLP(seed=11)
    x = ctx.randn(*shape, seed=12)

    def make_gf(net, **options):
        model = gf.Model(net, process, "velocity")
        return lambda: gf.log_likelihood(model, x, method="exact", rtol=tol, atol=tol, **options)

    def make_gf_compiled(net):  # a Counted net stays outside the compiled drift (its counter would recompile it)
        model = gf.Model(net.net if isinstance(net, Counted) else net, process, "velocity")

        def run():
            logp, info = gf.log_likelihood(model, x, method="exact", rtol=tol, atol=tol, compile=True, return_info=True)
            if isinstance(net, Counted):
                net.calls += info["nfe"]  # one network call per drift evaluation
            return logp
        return run

    def make_score_sde(net):
        model = gf.Model(net, process, "velocity")
        return lambda: _score_sde_likelihood(model, x, rtol=tol, atol=tol)

    def make_fm(net):
        model = gf.Model(net, process, "velocity")
        batch = x.shape[0]

        def velocity(x, t):  # flow_matching's time s = 1 - t (data at s = 1), velocity d/ds = -v
            return -model.velocity(x, (1.0 - t).to(x.dtype).expand(batch))

        solver = ODESolver(velocity_model=velocity)
        grid = torch.tensor([1.0, 0.0], dtype=x.dtype, device=x.device)
        return lambda: solver.compute_likelihood(x_1=x, log_p0=_std_normal_logp, step_size=None, method="dopri5",
                                                 atol=tol, rtol=tol, time_grid=grid, exact_divergence=True)[1]

    def reference():
        model = gf.Model(net, process, "velocity")
        return _score_sde_likelihood(model, x.double(), rtol=1e-10, atol=1e-10, method="DOP853", dtype=torch.float64)

    reference = _cache(reference)
    how = ("max |genflow - peer| logp (nats) <= (their errors vs a float64 scipy DOP853 solve at rtol = atol = 1e-10) "
           "+ 1e-4, relative to max |peer|; each error < 5% of it")

    def baselines(ours):
        out = [Baseline("score_sde-style scipy RK45", make_score_sde(net),
                        _equal_work(ours, make_score_sde, net, 1e-4, reference=reference, how=how),
                        note="solve_ivp over the flattened batch, numpy round trip per rhs")]
        if fm is None:
            out.append(Baseline("flow_matching compute_likelihood", None, status="skipped: flow_matching not installed"))
        else:
            out.append(Baseline("flow_matching compute_likelihood", make_fm(net),
                                _equal_work(ours, make_fm, net, 1e-4, reference=reference, how=how),
                                note="ODESolver dopri5 (torchdiffeq), exact_divergence=True"))
        return out

    yield Case(case, size, make_gf(net), baselines(make_gf),
               note="exact divergence on all sides; LinearPath velocity MLP; per-sample steps")
    if ctx.compile:
        yield Case(case + ", compile=True", size, make_gf_compiled(net), baselines(make_gf_compiled),
                   note="genflow's drift torch.compiled (compiled in the warm-up call, kept per model)")

    # (2) one Hutchinson divergence estimate
    batch = _divergence_batch(ctx)
    big = MLP(hidden=512, seed=13)
    model = gf.Model(big, process, "velocity")
    xb = ctx.randn(batch, 2, seed=14)
    tb = torch.full((batch,), 0.5, dtype=ctx.dtype, device=ctx.device)
    eps = hutchinson.probes(xb.shape, seed=15, offset=0, kind="rademacher", dtype=xb.dtype, device=xb.device)
    drift = _Drift(model, "hutchinson", [eps], "vjp")

    def estimate():
        return drift(xb, tb)[1]

    def forward():
        with torch.no_grad():
            return model.velocity(xb, tb)

    def plain():
        _, vjp_fn = torch.func.vjp(lambda y: model.velocity(y, tb), xb)
        (g,) = vjp_fn(eps)
        return (g * eps).sum(1)

    def check_plain():
        a = agree(estimate(), plain(), 1e-5)
        a.how = "same Rademacher probe; " + a.how
        return a

    yield Case("hutchinson div estimate, mlp512", f"({batch},2)", estimate, [
        Baseline("torch.func vjp", plain, check_plain),
        Baseline("one forward pass", forward, kind="bound",
                 note="bound: ratio = forward / estimate, the estimate costs 1/ratio forwards (target <= 2.5: ratio >= 0.4)"),
    ], note="3 -> 512 -> 512 -> 2 SiLU MLP, one Rademacher probe")
    if xb.device.type == "cuda":  # the same estimate replayed from a CUDA graph (log_likelihood(cuda_graph=True))
        from genflow.likelihood import _GraphedDrift

        graphed = _GraphedDrift(drift, xb, tb)
        yield Case("hutchinson div estimate, mlp512, cuda graph", f"({batch},2)", lambda: graphed(xb, tb)[1], [
            Baseline("torch.func vjp", plain, lambda: agree(graphed(xb, tb)[1], plain(), 1e-5)),
            Baseline("one forward pass", forward, kind="bound",
                     note="bound: the estimate costs 1/ratio forwards (target <= 2.5: ratio >= 0.4)"),
        ], note="log_likelihood(cuda_graph=True)'s drift: forward + VJP + probe_dot as one graph replay")



def _kernel_sizes(ctx):
    """(N = M, d) of the kernel rows: the SD-flow step sizes at d = 2, and d = 64."""
    if ctx.tiny:
        return [(512, 2)]
    if ctx.quick:
        return [(4096, 2), (16384, 2), (4096, 64)]
    return [(4096, 2), (16384, 2), (65536, 2), (4096, 64), (16384, 64)]


def kernel_mean_chunked_torch(q, k, v, sigma, chunk=1024):
    """The Gaussian-kernel weighted mean as a PyTorch user writes it: query chunks of ``chunk`` rows,
    ``torch.cdist`` (matmul-based), softmax, product with the values; memory O(chunk * M)."""
    out = q.new_empty((q.shape[0], v.shape[1]))
    for i in range(0, q.shape[0], chunk):
        s = torch.cdist(q[i:i + chunk], k).square_().mul_(-0.5 / sigma ** 2)
        out[i:i + chunk] = torch.softmax(s, 1) @ v
    return out


@group("kernel", "Gaussian-kernel weighted mean (kernel SD-flow step) vs chunked and dense PyTorch")
def _kernel(ctx: Context) -> Iterator[Case]:
    """``kernel_weighted_mean(q, k, sigma=)`` with values = keys (the denoiser E[x | z] of the kernel
    SD flow, seed 004), N = M, float32. Peers: chunked PyTorch (cdist, softmax, matmul over query
    chunks of 1024) and dense PyTorch (the full N x M matrix, where it fits in 4 GB). Sigma = 0.1
    at d = 2 and 4 at d = 64 (scores of order 10 on standard normal points)."""
    from genflow.ops import kernel_weighted_mean

    for n, d in _kernel_sizes(ctx):
        q, k = ctx.randn(n, d, seed=20), ctx.randn(n, d, seed=21)
        sigma = 0.1 if d <= 3 else 4.0
        ours = kernel_weighted_mean(q, k, sigma=sigma)

        def genflow(q=q, k=k, sigma=sigma):
            return kernel_weighted_mean(q, k, sigma=sigma)

        def chunked(q=q, k=k, sigma=sigma):
            return kernel_mean_chunked_torch(q, k, k, sigma)

        def dense(q=q, k=k, sigma=sigma):
            return torch.softmax(torch.cdist(q, k).square_().mul_(-0.5 / sigma ** 2), 1) @ k

        baselines = [Baseline("chunked PyTorch", chunked, lambda ours=ours, f=chunked: agree(ours, f(), 1e-4))]
        if 3 * n * n * q.element_size() <= 4 * 2 ** 30:
            baselines.append(Baseline("dense PyTorch", dense, lambda ours=ours, f=dense: agree(ours, f(), 1e-4)))
        else:
            baselines.append(Baseline("dense PyTorch", None,
                                      status=f"skipped: the {n}x{n} matrices need {3 * n * n * 4 / 2 ** 30:.0f} GB"))
        yield Case("kernel_weighted_mean", f"N=M={n}, d={d} f32", genflow, baselines,
                   note="values = keys; streaming log-sum-exp, no N x M matrix")


def _train_batch(ctx):
    return 256 if ctx.tiny else 4096


def _vp_alpha_sigma(process, t):
    """VP's ``alpha = exp(-t^2 (b1 - b0)/4 - t b0/2)`` and ``sigma = sqrt(1 - alpha^2)``, written out."""
    log_alpha = -0.25 * t ** 2 * (process.beta_max - process.beta_min) - 0.5 * t * process.beta_min
    return log_alpha.exp(), (-torch.expm1(2.0 * log_alpha)).sqrt()


def _loss_and_grads(loss_fn, net):
    """The loss and the flattened gradient of ``net``'s parameters (one fresh backward)."""
    net.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in net.parameters()])


@group("train", "training steps/s on the 2D MLP, batch 4096: flow matching vs torchcfm, DSM vs a plain PyTorch loop")
def _train(ctx: Context) -> Iterator[Case]:
    """One optimiser step (loss, backward, AdamW step; no EMA, no clipping) at batch 4096 (256 with
    --tiny) of 2D data on ``genflow.train.nets.MLP(2)`` (hidden 256, 3 FiLM blocks), the same
    initial weights on both sides. genflow's step is what ``genflow.train.train`` does per step:
    ``sample_seeds`` for the step, ``family.loss`` (per-sample Philox draws of the noise and the
    time), backward, ``AdamW.step``.

    (1) ``make_family("flow-matching")`` (independent coupling, sigma_min = 0) against torchcfm's
    training loop: ``ConditionalFlowMatcher(sigma=0).sample_location_and_conditional_flow(x0, x1)``
    with ``x0 ~ N(0, I)``, ``net(xt, t)``, MSE to ``ut``. torchcfm puts the data at t = 1 (genflow at
    t = 0), so its time is ``1 - t`` and its target ``-u``: the check runs torchcfm's loss on
    genflow's draws with the network seen as ``-net(x, 1 - t)`` and compares loss and gradients.

    (2) ``make_family("diffusion", process="VP", prediction="eps")`` (uniform t on [t_min, 1],
    ``x_t = alpha x0 + sigma eps``, MSE of eps) against the same loss written as a plain PyTorch
    loop (torchcfm has no DSM loop); checked the same way on genflow's draws.

    Both sides run in this process, so with the same torch threads (``--threads``; 1 is the
    steadiest on a busy machine). Per step, genflow's per-sample draws cost about 0.5 ms more than
    ``torch.rand``/``randn_like`` at batch 4096 (measured on a 2-core CPU), against ~150-400 ms for
    the network's forward and backward."""
    from genflow import _peers
    from genflow.train import families, make_family, objectives
    from genflow.train.nets import MLP as TrainMLP
    from genflow.train.trainer import sample_seeds

    batch = _train_batch(ctx)
    size = f"({batch},2)"
    data = ctx.randn(batch, 2, seed=30)
    seeds = sample_seeds(0, 0, 0, 0, batch, ctx.device)

    def stepper(loss_fn, net):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        state = {"step": 0}

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(state["step"])
            loss.backward()
            opt.step()
            state["step"] += 1
            return loss.detach()
        return step

    def twins(name, **options):
        torch.manual_seed(31)
        net = TrainMLP(2).to(ctx.device, ctx.dtype)
        family = make_family(name, data_shape=(2,), net=net, **options)
        peer_net = TrainMLP(2).to(ctx.device, ctx.dtype)
        peer_net.load_state_dict(net.state_dict())
        return family, peer_net

    def gf_step(family):
        return stepper(lambda k: family.loss("main", data, seeds=sample_seeds(0, k, 0, 0, batch, ctx.device)),
                       family.modules["net"])

    def draws(family):
        noise = objectives.draw_normal(data.shape, seeds, families._NOISE, dtype=data.dtype, device=data.device)
        return noise, objectives.draw_uniform(seeds, families._TIME, device=data.device)

    def check(family, peer_net, peer_loss):
        """Loss and gradients of both sides, same weights, on genflow's draws for ``seeds`` (rel. tol 1e-4)."""
        peer_net.load_state_dict(family.modules["net"].state_dict())
        ours = _loss_and_grads(lambda: family.loss("main", data, seeds=seeds), family.modules["net"])
        theirs = _loss_and_grads(lambda: peer_loss(peer_net, *draws(family)), peer_net)
        a = agree(ours, theirs, 1e-4)
        a.how = "loss and every gradient entry on the same draws; " + a.how
        return a

    # (1) flow matching vs torchcfm
    fm_family, fm_net = twins("flow-matching")
    cfm = _peers.optional("torchcfm.conditional_flow_matching")
    if cfm is None:
        peer = Baseline("torchcfm ConditionalFlowMatcher loop", None, status="skipped: torchcfm not installed")
    else:
        matcher = cfm.ConditionalFlowMatcher(sigma=0.0)

        def torchcfm_loss(net, x0, x1, t=None):
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1, t)
            return torch.mean((net(xt, t) - ut) ** 2)

        def torchcfm_on_draws(net, noise, t):  # genflow's time and velocity convention
            def flipped(x, s):
                return -net(x, 1.0 - s)
            return torchcfm_loss(flipped, noise, data, (1.0 - t).to(data.dtype))

        peer = Baseline("torchcfm ConditionalFlowMatcher loop",
                        stepper(lambda k: torchcfm_loss(fm_net, torch.randn_like(data), data), fm_net),
                        lambda: check(fm_family, fm_net, torchcfm_on_draws),
                        note="x0 = randn_like, sample_location_and_conditional_flow, MSE, AdamW")
    yield Case("flow-matching train step", size, gf_step(fm_family), [peer],
               note="MLP(2) hidden 256 x 3 blocks; AdamW lr 1e-3, no EMA/clip")

    # (2) denoising score matching (VP, eps) vs a plain PyTorch loop
    family, peer_net = twins("diffusion", process="VP", prediction="eps")
    process = family.process

    def dsm_loss(net, eps, t):
        alpha, sigma = _vp_alpha_sigma(process, t.to(data.dtype)[:, None])
        return torch.mean((net(alpha * data + sigma * eps, t.to(data.dtype)) - eps) ** 2)

    def plain_dsm(k):
        t = process.t_min + (process.T - process.t_min) * torch.rand(batch, device=data.device, dtype=data.dtype)
        return dsm_loss(peer_net, torch.randn_like(data), t)

    yield Case("DSM (VP, eps) train step", size, gf_step(family), [
        Baseline("plain PyTorch DSM loop", stepper(plain_dsm, peer_net),
                 lambda: check(family, peer_net, lambda net, eps, _u: dsm_loss(net, eps, family.times(seeds)[0])),
                 note="t ~ U[t_min, 1], randn_like, closed-form VP alpha/sigma, MSE, AdamW")],
        note="MLP(2) hidden 256 x 3 blocks; AdamW lr 1e-3, no EMA/clip")


if __name__ == "__main__":
    sys.exit(main())
