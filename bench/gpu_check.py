"""One-call GPU verification of genflow (issue 18): ``bash bench/gpu_check.sh OUT``.

On a CUDA machine it runs, in order and each within a time budget (the whole under 9 minutes on
an H100):

1. ``environment``: torch, CUDA, the device, nvcc, compute-sanitizer, the optional peers;
2. ``build``: ``GENFLOW_BUILD_CUDA=1 python setup.py build_ext --inplace`` for the device's
   architecture, then checks that ``genflow._C`` has its CUDA kernels;
3. ``tests``: every test file with CUDA cases (``cuda_test_files``; pytest-xdist when installed);
4. ``memcheck``, ``racecheck``, ``synccheck``: ``compute-sanitizer`` over the CUDA op tests
   (``tests/ops -k cuda``), instrumenting genflow's kernels only (``--kernel-name kns=genflow``);
5. ``bench``: ``genflow bench --device cuda --only ops,model,likelihood --no-compile`` (the Euler-Maruyama,
   batch-1 and large-batch solve and Hutchinson targets are read off its rows);
6. ``targets``: the SD-flow step at 262,144^2 and 1M^2 and ``log_likelihood(cuda_graph=True)``
   against eager, timed here (``genflow.bench.time_interleaved``);

then checks the GPU targets of DESIGN.md §6 (measured value, target, pass/fail) and writes
``OUT/report.json`` and ``OUT/report.md`` (with the logs ``build.log``, ``tests.log``,
``sanitizers.log``, ``bench.log``, ``bench.json``: seven files in all). A stage whose budget
runs out is stopped and reported as ``timeout``; a stage that cannot run says why it was skipped.

``--dry-run`` (any machine) runs what a CPU can: the environment, the CUDA test selection
(``pytest --collect-only``), the bench groups and the timed targets on the CPU at the smallest
sizes (checking that every code path runs, not the targets: their pass/fail is left empty), and
reports the rest as skipped. Exit code: 0 when everything ran and passed, 1 when a stage or a
target failed, 3 when nothing failed but a stage timed out or a target was not measured, 2 for a
non-dry run without a CUDA device.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "genflow-gpu-check/1"
TOTAL_BUDGET_S = 520.0   # every stage together: under 9 minutes
RESERVE_S = 10.0         # kept back for the report
BUDGET_S = {"environment": 15, "build": 120, "tests": 100, "memcheck": 50, "racecheck": 50, "synccheck": 40,
            "bench": 100, "targets": 45}   # adds up to TOTAL_BUDGET_S - RESERVE_S
STAGES = tuple(BUDGET_S)
SANITIZERS = ("memcheck", "racecheck", "synccheck")
SANITIZER_ERROR_EXIT = 86
BENCH_GROUPS = ("ops", "model", "likelihood")
LOG_OF = {"build": "build.log", "tests": "tests.log", "memcheck": "sanitizers.log", "racecheck": "sanitizers.log",
          "synccheck": "sanitizers.log", "bench": "bench.log", "targets": "bench.log"}


@dataclass
class Stage:
    """One stage's outcome: status is passed | failed | timeout | skipped."""

    name: str
    status: str
    seconds: float = 0.0
    budget_s: float = 0.0
    reason: str = ""
    detail: dict = field(default_factory=dict)


@dataclass
class Target:
    """One GPU target of DESIGN.md §6: ``passed`` is None when it was not judged (dry run, missing)."""

    name: str
    target: str
    value: Optional[float] = None
    unit: str = ""
    passed: Optional[bool] = None
    detail: str = ""


@dataclass
class Outcome:
    """What ``run_command`` returns: exit code (None on timeout), seconds and the output's tail."""

    returncode: Optional[int]
    seconds: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_command(argv: List[str], budget_s: float, log: Path, *, env: Optional[dict] = None) -> Outcome:
    """Run ``argv`` from the repository root for at most ``budget_s`` seconds (its whole process
    group is killed then), appending its output to ``log``; returns the exit code and output."""
    started = time.perf_counter()
    with open(log, "a") as sink:
        sink.write(f"\n$ {' '.join(argv)}\n")
        sink.flush()
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=max(budget_s, 1.0))
            code = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            code = None
        sink.write(output)
        sink.write(f"[exit {code if code is not None else f'timeout after {budget_s:.0f} s'}]\n")
    return Outcome(code, time.perf_counter() - started, output)


def pytest_summary(output: str) -> dict:
    """Counts from pytest's closing line: ``{"passed": 3, "skipped": 1}`` from ``3 passed, 1 skipped
    in 2.0s``, ``{"collected": 12}`` from ``12 tests collected in 1.0s``."""
    counts = {}
    pattern = r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|tests? collected)\b"
    for number, word in re.findall(pattern, output):
        key = "collected" if word.endswith("collected") else "error" if word.startswith("error") else word
        counts[key] = int(number)
    return counts


class Check:
    """The state of one run: where the report goes, the deadline, the stages and targets so far."""

    def __init__(self, out: Path, dry_run: bool, total_budget_s: float = TOTAL_BUDGET_S):
        self.out, self.dry_run = out, dry_run
        self.started = time.perf_counter()
        self.deadline = self.started + total_budget_s
        self.total_budget_s = total_budget_s
        self.stages: List[Stage] = []
        self.targets: List[Target] = []
        self.environment: dict = {}
        self.python = sys.executable

    def budget(self, name: str) -> float:
        return max(0.0, min(BUDGET_S[name], self.deadline - time.perf_counter() - RESERVE_S))

    def stage(self, name: str) -> Optional[Stage]:
        return next((s for s in self.stages if s.name == name), None)

    def passed(self, name: str) -> bool:
        s = self.stage(name)
        return s is not None and s.status == "passed"

    def skip(self, name: str, reason: str, **detail) -> Stage:
        stage = Stage(name, "skipped", budget_s=BUDGET_S[name], reason=reason, detail=detail)
        self.stages.append(stage)
        return stage

    def command_stage(self, name: str, argvs: List[List[str]], *, env: Optional[dict] = None,
                      judge: Callable[[List[Outcome]], tuple] = None) -> Stage:
        """Run the commands ``argvs`` one after another as stage ``name``, sharing its budget (a
        timeout stops the stage); ``judge(outcomes)`` returns ``(status, reason, detail)`` when all
        finished (default: every exit code 0 passes)."""
        budget = self.budget(name)
        if budget < 1.0:
            return self.skip(name, "the run's total time budget is spent")
        outcomes: List[Outcome] = []
        for argv in argvs:
            left = budget - sum(o.seconds for o in outcomes)
            outcomes.append(run_command(argv, left, self.out / LOG_OF[name], env=env))
            if outcomes[-1].timed_out:
                break
        output = "".join(o.output for o in outcomes)
        if outcomes[-1].timed_out:
            progress = re.findall(r"\[\s*(\d+)%\]", output)
            status, reason = "timeout", f"stopped at its budget of {budget:.0f} s" + (
                f" ({progress[-1]}% of the selected tests done)" if progress else "")
            detail = {}
        elif judge is not None:
            status, reason, detail = judge(outcomes)
        else:
            codes = [o.returncode for o in outcomes]
            status = "passed" if not any(codes) else "failed"
            reason, detail = ("" if status == "passed" else f"exit codes {codes}"), {}
        detail = {"commands": [" ".join(a) for a in argvs], **detail, "output_tail": output[-1500:]}
        stage = Stage(name, status, round(sum(o.seconds for o in outcomes), 1), round(budget, 1), reason, detail)
        self.stages.append(stage)
        return stage


# ---------------------------------------------------------------- the stages

def cuda_device() -> Optional[str]:
    """Why no CUDA device can be used, or None when one can."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def find_tool(name: str) -> Optional[str]:
    """``name`` on PATH, else in the CUDA toolkit (``$CUDA_HOME/bin``, /usr/local/cuda/bin)."""
    found = shutil.which(name)
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if found is None and home and os.access(os.path.join(home, "bin", name), os.X_OK):
            found = os.path.join(home, "bin", name)
    return found


def stage_environment(check: Check) -> None:
    import importlib.util

    import torch

    started = time.perf_counter()
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cpus": os.cpu_count(), "device": None, "nvcc": None, "compute_sanitizer": find_tool("compute-sanitizer"),
           "peers": {name: importlib.util.find_spec(name) is not None
                     for name in ("k_diffusion", "diffusers", "flow_matching", "torchdiffeq", "scipy")}}
    if cuda_device() is None:
        props = torch.cuda.get_device_properties(0)
        env["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_GiB": round(props.total_memory / 2 ** 30, 1), "sms": props.multi_processor_count}
    nvcc = find_tool("nvcc")
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        release = re.search(r"release ([\d.]+)", version)
        env["nvcc"] = {"path": nvcc, "release": release.group(1) if release else None}
    check.environment = env
    check.stages.append(Stage("environment", "passed", round(time.perf_counter() - started, 1),
                              BUDGET_S["environment"], "", {"no_cuda_device": cuda_device() or ""}))


def stage_build(check: Check) -> None:
    import torch

    if check.dry_run or cuda_device():
        check.skip("build", ("dry run" if check.dry_run else f"no GPU: {cuda_device()}")
                   + " (CI builds the CUDA extension without a GPU: .ci/cuda_build.sh)")
        return
    major, minor = torch.cuda.get_device_capability(0)
    env = {"GENFLOW_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}"),
           "MAX_JOBS": str(os.cpu_count() or 4)}
    nvcc = find_tool("nvcc")
    if "CUDA_HOME" not in os.environ and nvcc:  # a wrapper nvcc on PATH: point at the real toolkit
        home = Path(os.path.realpath(nvcc)).parents[1]
        env["CUDA_HOME"] = str(home if (home / "include" / "cuda_runtime.h").is_file() else "/usr/local/cuda")
    probe = "import sys, torch, genflow; sys.exit(0 if torch.ops.genflow.has_cuda() else 3)"

    def judge(outcomes):
        outcome = outcomes[0]
        if outcome.returncode != 0:
            return "failed", f"the build failed (exit {outcome.returncode}): see build.log", {}
        loaded = subprocess.run([check.python, "-c", probe], cwd=ROOT, capture_output=True, text=True)
        if loaded.returncode != 0:
            return "failed", "built, but genflow._C has no CUDA kernels: " + loaded.stderr[-300:], {}
        return "passed", "", {"TORCH_CUDA_ARCH_LIST": env["TORCH_CUDA_ARCH_LIST"]}

    check.command_stage("build", [[check.python, "setup.py", "build_ext", "--inplace"]], env=env, judge=judge)


CUDA_TEST = re.compile(r"not torch\.cuda\.is_available\(\)|torch\.cuda\.is_available\(\) and")


def cuda_test_files() -> List[str]:
    """The test files with CUDA cases: those that skip or parametrize on a visible CUDA device
    (``skipif(not torch.cuda.is_available() ...)``, ``["cuda"] if torch.cuda.is_available() and ...``)."""
    return [str(path.relative_to(ROOT)) for path in sorted((ROOT / "tests").rglob("test_*.py"))
            if path.name != "test_gpu_check.py" and CUDA_TEST.search(path.read_text(errors="replace"))]


def stage_tests(check: Check) -> None:
    import importlib.util

    files = cuda_test_files()
    argv = [check.python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if check.dry_run:
        argv.append("--collect-only")
    elif not check.passed("build"):
        check.skip("tests", "the CUDA build did not pass", files=files)
        return
    elif importlib.util.find_spec("xdist") is not None:
        argv += ["-n", str(min(8, os.cpu_count() or 1))]

    def judge(outcomes):
        outcome = outcomes[0]
        counts = pytest_summary(outcome.output)
        ok = outcome.returncode == 0 and (counts.get("passed", 0) > 0 or counts.get("collected", 0) > 0)
        reason = "" if ok else f"pytest exit {outcome.returncode}"
        if check.dry_run:
            reason = "dry run: collection only (the CUDA cases skip without a GPU)"
        return ("passed" if ok else "failed"), reason, {"files": files, "counts": counts}

    check.command_stage("tests", [argv + files], judge=judge)


def sanitizer_argv(check: Check, tool: str, sanitizer: str) -> List[str]:
    return [sanitizer, "--tool", tool, "--kernel-name", "kns=genflow", "--error-exitcode", str(SANITIZER_ERROR_EXIT),
            "--print-limit", "20", check.python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/ops",
            "-k", "cuda"]


def stage_sanitizers(check: Check) -> None:
    sanitizer = check.environment.get("compute_sanitizer")
    for tool in SANITIZERS:
        argv = sanitizer_argv(check, tool, sanitizer or "compute-sanitizer")
        if check.dry_run or not sanitizer or not check.passed("build"):
            why = ("dry run: needs a CUDA device, compute-sanitizer and the CUDA build" if check.dry_run
                   else "compute-sanitizer not found" if not sanitizer else "the CUDA build did not pass")
            check.skip(tool, why, command=" ".join(argv))
            continue

        def judge(outcomes, tool=tool):
            outcome = outcomes[0]
            errors = re.search(r"ERROR SUMMARY: (\d+) error", outcome.output)
            detail = {"sanitizer_errors": int(errors.group(1)) if errors else None,
                      "counts": pytest_summary(outcome.output)}
            if outcome.returncode == 0:
                return "passed", "", detail
            if outcome.returncode == SANITIZER_ERROR_EXIT:
                return "failed", f"{tool} reported errors: see sanitizers.log", detail
            return "failed", f"the tests failed under {tool} (exit {outcome.returncode})", detail

        # every tensor its own allocation, so memcheck sees a write past a tensor's end
        check.command_stage(tool, [argv], env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, judge=judge)


def stage_bench(check: Check) -> None:
    """``genflow bench`` one group at a time (a group cut off by the budget leaves the others'
    rows), each into its own JSON in ``bench-groups/``, merged into ``bench.json``."""
    if check.dry_run:
        device = ["--device", "cpu", "--tiny", "--rounds", "2"]
    elif not check.passed("build"):
        check.skip("bench", "the CUDA build did not pass")
        return
    else:
        device = ["--device", "cuda", "--rounds", "3"]
    parts = check.out / "bench-groups"
    parts.mkdir(exist_ok=True)
    argvs = [[check.python, "-m", "genflow.cli", "bench", "--only", group, "--no-compile", "--no-results",
              "--json", str(parts / f"{group}.json")] + device for group in BENCH_GROUPS]

    def judge(outcomes):
        codes = [o.returncode for o in outcomes]
        ok = not any(codes)
        return ("passed" if ok else "failed"), ("" if ok else f"exit codes {codes}: a row failed its "
                                                "agreement check or errored, see bench.log"), {}

    try:
        check.command_stage("bench", argvs, judge=judge)
    finally:
        rows = []
        for group in BENCH_GROUPS:
            if (parts / f"{group}.json").is_file():
                rows += json.loads((parts / f"{group}.json").read_text())["rows"]
        (check.out / "bench.json").write_text(json.dumps({"schema": SCHEMA, "rows": rows}, indent=1))
        shutil.rmtree(parts)


def stage_targets(check: Check) -> None:
    argv = [check.python, str(Path(__file__).resolve()), "measure", "--json", str(check.out / "targets.tmp.json")]
    if check.dry_run:
        argv += ["--device", "cpu", "--tiny"]
    elif not check.passed("build"):
        check.skip("targets", "the CUDA build did not pass")
        return
    else:
        argv += ["--device", "cuda"]
    check.command_stage("targets", [argv])


# ---------------------------------------------------------------- the measurements (subcommand ``measure``)

def measure(device: str, tiny: bool) -> dict:
    """Time the targets the bench groups do not cover: the SD-flow step (``kernel_weighted_mean``,
    d = 2, sigma = 0.1, N = M) at 262,144 and 1,048,576 (4096 with ``tiny``) and a log-likelihood
    (1024 2-D points, the bench's flow-matching MLP, Hutchinson, generator 0) with
    ``cuda_graph=True`` against eager (on a CPU both eager)."""
    import warnings

    import genflow as gf
    from genflow.bench import Context, time_interleaved  # first: it loads bench/cases, common.py included
    from genflow.ops import kernel_weighted_mean
    from bench.cases.common import MLP

    ctx = Context(device=device, rounds=3, round_s=0.01 if tiny else 0.05, fn_budget_s=4.0)
    out = {"device": device, "tiny": tiny, "sd_flow_ms": {}}
    for n in ([4096] if tiny else [262_144, 1_048_576]):
        q, k = ctx.randn(n, 2, seed=20), ctx.randn(n, 2, seed=21)
        out["sd_flow_ms"][str(n)] = time_interleaved({"step": lambda: kernel_weighted_mean(q, k, sigma=0.1)},
                                                     ctx)["step"]
    model = gf.Model(MLP(seed=11), gf.LinearPath(), "velocity")
    x = ctx.randn(64 if tiny else 1024, 2, seed=12)
    graph = device == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager_logp = gf.log_likelihood(model, x, generator=0)
        graph_logp = gf.log_likelihood(model, x, generator=0, cuda_graph=graph)
    fallbacks = [str(w.message) for w in caught if "cuda_graph" in str(w.message)]
    ms = time_interleaved({"eager": lambda: gf.log_likelihood(model, x, generator=0),
                           "graph": lambda: gf.log_likelihood(model, x, generator=0, cuda_graph=graph)}, ctx)
    out["likelihood"] = {"eager_ms": ms["eager"], "graph_ms": ms["graph"], "graph": graph,
                         "max_abs_diff": (eager_logp - graph_logp).abs().max().item(), "capture_fallbacks": fallbacks}
    return out


# ---------------------------------------------------------------- the targets

def bench_rows(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("rows", [])


def row_size(row: dict) -> int:
    """The element count named by a bench row's size ("12.6e6 f32", "(65536,2)" -> its product)."""
    numbers = [float(v) for v in re.findall(r"\d+(?:\.\d+)?(?:e\d+)?", row["size"].split(" f")[0])]
    product = 1.0
    for v in numbers:
        product *= v
    return int(product)


def pick(rows: List[dict], *, group: str, case: Callable[[str], bool], kind: str, size=None) -> Optional[dict]:
    """The timed row of ``group`` whose case matches, of baseline ``kind``, at ``size`` (default: the largest)."""
    found = [r for r in rows if r["group"] == group and case(r["case"]) and r["kind"] == kind
             and r.get("genflow_ms") is not None and (size is None or r["size"] == size)]
    return max(found, key=row_size) if found else None


def judge_targets(rows: List[dict], measured: Optional[dict], dry_run: bool) -> List[Target]:
    """The DESIGN.md §6 GPU targets from the bench rows and the ``measure`` results."""
    targets = []
    em = pick(rows, group="ops", case=lambda c: c == "em_step", kind="floor")
    t = Target("Euler-Maruyama step, 12.6M float32", "<= 0.066 ms and <= 1.25x the device-copy floor", unit="ms")
    if em:
        t.value, ratio = em["genflow_ms"], em["genflow_ms"] / em["baseline_ms"]
        t.passed = t.value <= 0.066 and ratio <= 1.25
        t.detail = f"size {em['size']}; floor {em['baseline_ms']:.4f} ms; {ratio:.2f}x the floor"
    targets.append(t)

    graphed = pick(rows, group="model", case=lambda c: c.startswith("dpmpp_2m") and "mlp" in c and c.endswith("cuda graph"),
                   kind="bound", size="(1,2)")
    t = Target("20-step DPM-Solver++(2M), batch 1, CUDA graph", "<= 0.56 ms (k-diffusion 11.2 ms)", unit="ms")
    if graphed:
        t.value, t.passed, t.detail = graphed["genflow_ms"], graphed["genflow_ms"] <= 0.56, graphed["case"]
    targets.append(t)

    solves = [r for r in rows if r["group"] == "model" and "mlp" in r["case"] and r["kind"] == "bound"
              and r.get("genflow_ms") and r.get("baseline_ms") and r["size"] != "(1,2)"]
    t = Target("large-batch 20-step solve vs the model's own 20 evaluations", "<= 1.1x the model's time", unit="x")
    if solves:
        best = min(solves, key=lambda r: r["genflow_ms"] / r["baseline_ms"])
        t.value = best["genflow_ms"] / best["baseline_ms"]
        t.passed = t.value <= 1.1
        t.detail = f"{best['case']} {best['size']}: solve {best['genflow_ms']:.3f} ms, model {best['baseline_ms']:.3f} ms"
    targets.append(t)

    sd = (measured or {}).get("sd_flow_ms", {})
    for n, label, limit in (("262144", "262,144^2", 70.0), ("1048576", "1M^2", 1500.0)):
        t = Target(f"SD-flow step (kernel_weighted_mean) {label}, d = 2", f"{'<=' if n == '262144' else '<'} {limit:g} ms",
                   unit="ms")
        if n in sd:
            t.value = sd[n]
            t.passed = sd[n] <= limit if n == "262144" else sd[n] < limit
        elif sd:
            size, ms = next(iter(sd.items()))
            t.value, t.detail = ms, f"measured at {size}^2 instead"
        targets.append(t)

    hutch = [r for r in rows if r["group"] == "likelihood" and r["case"].startswith("hutchinson") and r["kind"] == "bound"
             and r.get("genflow_ms") and r.get("baseline_ms")]
    t = Target("Hutchinson divergence estimate (mlp512)", "<= 2.5 forward passes", unit="forwards")
    if hutch:
        best = min(hutch, key=lambda r: r["genflow_ms"] / r["baseline_ms"])
        t.value = best["genflow_ms"] / best["baseline_ms"]
        t.passed = t.value <= 2.5
        t.detail = f"{best['case']} {best['size']}: estimate {best['genflow_ms']:.4f} ms, forward {best['baseline_ms']:.4f} ms"
    targets.append(t)

    lik = (measured or {}).get("likelihood")
    t = Target("log_likelihood(cuda_graph=True) vs eager", "graph faster (ratio eager / graph > 1)", unit="x")
    if lik:
        t.value = lik["eager_ms"] / lik["graph_ms"]
        t.passed = t.value > 1.0 and not lik["capture_fallbacks"] and lik["graph"]
        t.detail = (f"eager {lik['eager_ms']:.2f} ms, graph {lik['graph_ms']:.2f} ms, max |diff| {lik['max_abs_diff']:.2e}"
                    + (f"; capture fell back: {lik['capture_fallbacks'][0]}" if lik["capture_fallbacks"] else "")
                    + ("" if lik["graph"] else "; no CUDA graph on this device (both eager)"))
    targets.append(t)

    for t in targets:
        if t.value is None:
            t.detail = t.detail or "not measured: its stage was skipped, failed or timed out"
        if dry_run:
            t.passed = None
            t.detail = "dry run on the CPU at the smallest sizes (code path only, not the target): " + t.detail
    return targets


# ---------------------------------------------------------------- the report

def report(check: Check) -> dict:
    measured_path = check.out / "targets.tmp.json"
    measured = json.loads(measured_path.read_text()) if measured_path.is_file() else None
    measured_path.unlink(missing_ok=True)
    check.targets = judge_targets(bench_rows(check.out / "bench.json"), measured, check.dry_run)
    failed = [s.name for s in check.stages if s.status == "failed"] + [t.name for t in check.targets if t.passed is False]
    incomplete = [s.name for s in check.stages if s.status == "timeout"]
    if not check.dry_run:
        incomplete += [t.name for t in check.targets if t.passed is None]
    doc = {"schema": SCHEMA, "mode": "dry-run" if check.dry_run else "gpu",
           "created": datetime.datetime.now().isoformat(timespec="seconds"),
           "wall_s": round(time.perf_counter() - check.started, 1), "budget_s": check.total_budget_s,
           "environment": check.environment, "stages": [asdict(s) for s in check.stages],
           "skipped": {s.name: s.reason for s in check.stages if s.status == "skipped"},
           "targets": [asdict(t) for t in check.targets], "failed": failed, "incomplete": incomplete,
           "ok": not failed and not incomplete}
    (check.out / "report.json").write_text(json.dumps(doc, indent=1))
    (check.out / "report.md").write_text(markdown(doc))
    return doc


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def verdict(doc: dict) -> str:
    """The report's headline: OK, or what failed and what did not finish."""
    if doc["ok"]:
        return "OK" + (" (dry run: the GPU stages and the targets' pass/fail are not checked)" if doc["mode"] == "dry-run" else "")
    parts = [f"FAILED: {', '.join(doc['failed'])}"] if doc["failed"] else []
    if doc["incomplete"]:
        parts.append(f"not finished or not measured: {', '.join(doc['incomplete'])}")
    return "; ".join(parts)


def markdown(doc: dict) -> str:
    env = doc["environment"]
    device = env.get("device") or {}
    lines = [f"# genflow GPU check ({doc['mode']})", "",
             f"{doc['created']}; {doc['wall_s']} s of a {doc['budget_s']:.0f} s budget; device "
             f"{device.get('name', 'none')} (sm {device.get('capability', '-')}); torch {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}); nvcc {(env.get('nvcc') or {}).get('release')}; compute-sanitizer "
             f"{'found' if env.get('compute_sanitizer') else 'not found'}.", "",
             f"**{verdict(doc)}**", "", "## Stages", "",
             "| stage | status | seconds / budget | notes |", "|---|---|---|---|"]
    for s in doc["stages"]:
        counts = s["detail"].get("counts")
        notes = "; ".join(filter(None, [s["reason"], ", ".join(f"{v} {k}" for k, v in counts.items()) if counts else ""]))
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} / {s['budget_s']:.0f} | {_cell(notes)} |")
    lines += ["", "## GPU targets (DESIGN.md §6)", "", "| target | measured | goal | pass | notes |",
              "|---|---|---|---|---|"]
    for t in doc["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.4g} {t['unit']}"
        mark = {True: "yes", False: "**NO**", None: "-"}[t["passed"]]
        lines.append(f"| {t['name']} | {value} | {_cell(t['target'])} | {mark} | {_cell(t['detail'])} |")
    if doc["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {name}: {reason}" for name, reason in doc["skipped"].items()]
    return "\n".join(lines) + "\n"


def check_all(out: Path, dry_run: bool, total_budget_s: float = TOTAL_BUDGET_S) -> dict:
    """Run every stage in order into ``out`` and write the report; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    for name in set(LOG_OF.values()) | {"bench.json", "report.json", "report.md"}:
        (out / name).unlink(missing_ok=True)
    check = Check(out, dry_run, total_budget_s)
    stage_environment(check)
    for run_stage in (stage_build, stage_tests, stage_sanitizers, stage_bench, stage_targets):
        run_stage(check)
    return report(check)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="every stage, then the report")
    run.add_argument("out", type=Path, help="folder for report.json, report.md and the logs")
    run.add_argument("--dry-run", action="store_true", help="run what a CPU can; report the rest as skipped")
    run.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="total seconds for all stages")
    timing = sub.add_parser("measure", help="(internal) time the targets that no bench group covers")
    timing.add_argument("--device", choices=("cpu", "cuda"), required=True)
    timing.add_argument("--tiny", action="store_true")
    timing.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "measure":
        args.json.write_text(json.dumps(measure(args.device, args.tiny), indent=1))
        return 0
    if args.command != "run":
        parser.error("give a command: run OUT [--dry-run] | measure")
    if not args.dry_run and cuda_device():
        doc = check_all(args.out, dry_run=False, total_budget_s=args.budget)
        print(f"no CUDA device ({cuda_device()}): every GPU stage skipped; wrote {args.out}/report.md")
        return 2
    doc = check_all(args.out, args.dry_run, args.budget)
    print((args.out / "report.md").read_text())
    return 0 if doc["ok"] else 1 if doc["failed"] else 3


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
