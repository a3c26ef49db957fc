"""bench/gpu_check.sh, the one-call GPU verification (issue 18): its dry run on this CPU, the
stage budget, the report and the DESIGN.md §6 target verdicts."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
GPU_STAGES = ("build", "memcheck", "racecheck", "synccheck")
TARGET_COUNT = 7


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    started = time.perf_counter()
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    return out, done, time.perf_counter() - started


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run's skips are those of a machine without CUDA")
def test_dry_run_report_lists_every_stage(dry_run):
    out, done, seconds = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "dry-run" and report["ok"]
    assert [s["name"] for s in report["stages"]] == list(gpu_check.STAGES)
    status = {s["name"]: s["status"] for s in report["stages"]}
    for name in GPU_STAGES:  # what needs a GPU is skipped and says why
        assert status[name] == "skipped"
        assert report["skipped"][name].startswith("dry run")
    for name in ("environment", "tests", "bench", "targets"):  # what a CPU can run ran
        assert status[name] == "passed", report["stages"]
    tests = next(s for s in report["stages"] if s["name"] == "tests")
    assert tests["detail"]["counts"]["collected"] > 100
    assert "tests/ops/test_fused_update.py" in tests["detail"]["files"]
    assert "tests/test_gpu_check.py" not in tests["detail"]["files"]
    sanitizer = next(s for s in report["stages"] if s["name"] == "racecheck")
    assert "--tool racecheck" in sanitizer["detail"]["command"]
    assert seconds < gpu_check.TOTAL_BUDGET_S
    # every target is listed; on the CPU the code paths ran but nothing is judged
    assert len(report["targets"]) == TARGET_COUNT
    assert all(t["passed"] is None and t["detail"].startswith("dry run") for t in report["targets"])
    measured = [t for t in report["targets"] if t["value"] is not None]
    assert len(measured) >= 5, report["targets"]  # the batch-1 graph and large-batch rows need CUDA
    markdown = (out / "report.md").read_text()
    for name in gpu_check.STAGES:
        assert f"| {name} |" in markdown
    for target in report["targets"]:
        assert target["name"] in markdown
    # what comes back from a lent GPU machine: at most 8 plain files, no folders
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files), files


def test_run_without_a_gpu_skips_every_gpu_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: "no CUDA device is visible")
    assert gpu_check.main(["run", str(tmp_path)]) == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == list(gpu_check.STAGES)
    assert set(report["skipped"]) == set(gpu_check.STAGES) - {"environment"}
    assert report["skipped"]["build"].startswith("no GPU")
    assert report["skipped"]["tests"] == "the CUDA build did not pass"
    assert not report["ok"] and len(report["incomplete"]) == TARGET_COUNT


def test_a_stage_past_its_budget_is_stopped_with_its_children(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.BUDGET_S, "bench", 1.5)
    check = gpu_check.Check(tmp_path, dry_run=True)
    started = time.perf_counter()
    # the shell's background child must die with it (the whole process group is killed)
    stage = check.command_stage("bench", [["bash", "-c", "sleep 30 & wait"], ["true"]])
    assert time.perf_counter() - started < 10
    assert stage.status == "timeout" and "budget of 2 s" in stage.reason
    assert stage.detail["commands"] == ["bash -c sleep 30 & wait", "true"]
    assert "[exit timeout after 2 s]" in (tmp_path / "bench.log").read_text()


def test_a_stage_shares_its_budget_and_judges_exit_codes(tmp_path):
    check = gpu_check.Check(tmp_path, dry_run=True)
    ok = check.command_stage("targets", [[sys.executable, "-c", "print('hi')"]])
    assert ok.status == "passed" and ok.detail["output_tail"] == "hi\n"
    bad = check.command_stage("tests", [["true"], ["false"]])
    assert bad.status == "failed" and bad.reason == "exit codes [0, 1]"
    check.deadline = time.perf_counter()  # the run's total budget is spent
    late = check.command_stage("bench", [["true"]])
    assert late.status == "skipped" and "total time budget" in late.reason


def test_pytest_summary():
    assert gpu_check.pytest_summary("..s\n3 passed, 1 skipped, 2 deselected in 2.01s\n") == {
        "passed": 3, "skipped": 1, "deselected": 2}
    assert gpu_check.pytest_summary("1 failed, 4 passed, 1 error in 0.1s") == {"failed": 1, "passed": 4, "error": 1}
    assert gpu_check.pytest_summary("2722 tests collected in 30.0s") == {"collected": 2722}
    assert gpu_check.pytest_summary("1 test collected in 0.1s") == {"collected": 1}


def test_row_size():
    assert gpu_check.row_size({"size": "1.26e7 f32"}) == 12_600_000
    assert gpu_check.row_size({"size": "(65536,2)"}) == 131_072
    assert gpu_check.row_size({"size": "4.1e3 f32"}) == 4100


def _row(group, case, size, kind, genflow_ms, baseline_ms):
    return {"group": group, "case": case, "size": size, "kind": kind, "genflow_ms": genflow_ms,
            "baseline_ms": baseline_ms}


ROWS = [
    _row("ops", "em_step", "1e6 f32", "floor", 0.010, 0.009),
    _row("ops", "em_step", "1.26e7 f32", "floor", 0.060, 0.053),
    _row("ops", "em_step", "1.26e7 f32", "peer", 0.060, 0.362),
    _row("model", "dpmpp_2m 20 steps, mlp256, cuda graph", "(1,2)", "bound", 0.40, 2.2),
    _row("model", "dpmpp_2m 20 steps, mlp256", "(1,2)", "bound", 3.0, 2.2),
    _row("model", "dpmpp_2m 20 steps, mlp256", "(65536,2)", "bound", 5.2, 4.8),
    _row("model", "dpmpp_2m 20 steps, mlp256, cuda graph", "(65536,2)", "bound", 5.0, 4.8),
    _row("likelihood", "hutchinson div estimate, mlp512", "(4096,2)", "bound", 0.3, 0.1),
    _row("likelihood", "hutchinson div estimate, mlp512, cuda graph", "(4096,2)", "bound", 0.22, 0.1),
]
MEASURED = {"sd_flow_ms": {"262144": 65.0, "1048576": 1600.0},
            "likelihood": {"eager_ms": 30.0, "graph_ms": 12.0, "graph": True, "max_abs_diff": 0.0,
                           "capture_fallbacks": []}}


def test_targets_are_judged_from_the_bench_rows_and_the_measurements():
    targets = {t.name: t for t in gpu_check.judge_targets(ROWS, MEASURED, dry_run=False)}
    assert len(targets) == TARGET_COUNT
    em = targets["Euler-Maruyama step, 12.6M float32"]
    assert em.value == 0.060 and em.passed and "1.13x the floor" in em.detail  # the largest size is used
    graph = targets["20-step DPM-Solver++(2M), batch 1, CUDA graph"]
    assert graph.value == 0.40 and graph.passed
    large = targets["large-batch 20-step solve vs the model's own 20 evaluations"]
    assert large.value == pytest.approx(5.0 / 4.8) and large.passed and "cuda graph" in large.detail
    assert targets["SD-flow step (kernel_weighted_mean) 262,144^2, d = 2"].passed
    assert targets["SD-flow step (kernel_weighted_mean) 1M^2, d = 2"].passed is False  # 1600 ms >= 1.5 s
    hutchinson = targets["Hutchinson divergence estimate (mlp512)"]
    assert hutchinson.value == pytest.approx(2.2) and hutchinson.passed
    likelihood = targets["log_likelihood(cuda_graph=True) vs eager"]
    assert likelihood.value == pytest.approx(2.5) and likelihood.passed


def test_targets_fail_past_their_limits_and_when_capture_fell_back():
    rows = [dict(r) for r in ROWS]
    rows[1]["genflow_ms"] = 0.070                       # over 0.066 ms
    rows[3]["genflow_ms"] = 0.60                        # over 0.56 ms
    rows[5]["genflow_ms"] = rows[6]["genflow_ms"] = 5.5  # 1.15x the model
    rows[7]["genflow_ms"] = rows[8]["genflow_ms"] = 0.3  # 3 forwards
    measured = json.loads(json.dumps(MEASURED))
    measured["likelihood"]["capture_fallbacks"] = ["cuda_graph=True: could not be captured"]
    targets = gpu_check.judge_targets(rows, measured, dry_run=False)
    judged = {t.name: t.passed for t in targets}
    assert [name for name, passed in judged.items() if passed] == ["SD-flow step (kernel_weighted_mean) 262,144^2, d = 2"]
    assert "capture fell back" in targets[-1].detail


def test_targets_without_rows_are_not_measured_and_a_dry_run_judges_nothing():
    missing = gpu_check.judge_targets([], None, dry_run=False)
    assert len(missing) == TARGET_COUNT
    assert all(t.value is None and t.passed is None and t.detail.startswith("not measured") for t in missing)
    dry = gpu_check.judge_targets(ROWS, MEASURED, dry_run=True)
    assert all(t.passed is None and t.detail.startswith("dry run") for t in dry)
    assert [t.value for t in dry] == [t.value for t in gpu_check.judge_targets(ROWS, MEASURED, dry_run=False)]


def test_sanitizer_commands_instrument_genflow_kernels_only():
    check = gpu_check.Check(Path("."), dry_run=True)
    argv = gpu_check.sanitizer_argv(check, "synccheck", "/usr/local/cuda/bin/compute-sanitizer")
    assert argv[:7] == ["/usr/local/cuda/bin/compute-sanitizer", "--tool", "synccheck", "--kernel-name", "kns=genflow",
                        "--error-exitcode", str(gpu_check.SANITIZER_ERROR_EXIT)]
    assert argv[-5:] == ["-p", "no:cacheprovider", "tests/ops", "-k", "cuda"]


def _check_cuda_ops():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_cuda_ops", ROOT / ".ci" / "check_cuda_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_cuda_op_check_reads_the_dispatcher():
    """.ci/check_cuda_ops.py (CI's check of the CUDA build) sees which keys have kernels: here an op
    with CPU and CUDA kernels, one with a CPU kernel only and a CPU-only ``_*_grouped`` test hook."""
    check = _check_cuda_ops()
    library = torch.library.Library("genflow", "FRAGMENT")
    for name in ("test_both_keys", "test_cpu_only", "_test_hook_grouped"):
        library.define(f"{name}(Tensor x) -> Tensor")
        library.impl(name, lambda x: x.clone(), "CPU")
    library.impl("test_both_keys", lambda x: x.clone(), "CUDA")
    try:
        table = check.kernel_table()
        assert table["genflow::test_both_keys"] == (True, True)
        assert table["genflow::test_cpu_only"] == (True, False)
        assert check.is_cpu_test_hook("genflow::_test_hook_grouped")
        assert not check.is_cpu_test_hook("genflow::test_cpu_only")
        assert not check.is_cpu_test_hook("genflow::fused_update")
        if torch.version.cuda is None:  # the check itself refuses a torch without CUDA
            assert check.main() == 1
    finally:
        library._destroy()
