"""``genflow bench``: the runner on tiny cases, its table, JSON and RESULTS.md block, the CUDA
error, and the equal-work checks of real genflow-vs-peer rows (fast: tiny sizes, one round)."""
import argparse
import importlib.util
import itertools
import json
import time

import pytest
import torch

from genflow import bench
from genflow.bench import Agreement, Baseline, Case, Context

from bench.cases.ops import noise_law

from .peers import diffusers, k_diffusion_sampling

TINY = Context(tiny=True, rounds=1, round_s=0.001, compile=False)


def _fake_group(slow_genflow=False, wrong_peer=False):
    """A group with one case: genflow and a peer computing ``2 x`` (or something else)."""
    x = torch.arange(8.0)

    def genflow():
        if slow_genflow:
            time.sleep(0.003)
        return 2 * x

    def peer():
        return 2 * x + (1.0 if wrong_peer else 0.0)

    def build(ctx):
        yield Case("double", "(8,)", genflow, [
            Baseline("peer", peer, lambda: bench.agree(genflow(), peer(), 1e-6)),
            Baseline("floor", lambda: x.clone(), kind="floor"),
            Baseline("absent", None, status="skipped: not installed"),
        ])
    return bench.Group("fake", "a fake group", build)


@pytest.fixture
def fake(monkeypatch):
    def install(**kwargs):
        monkeypatch.setitem(bench.GROUPS, "fake", _fake_group(**kwargs))
    return install


def test_runner_rows_and_table(fake):
    fake(slow_genflow=True)
    rows = bench.run_cases(TINY, ["fake"], log=lambda line: None)
    assert [(r.baseline, r.kind, r.status) for r in rows] == [
        ("peer", "peer", "ok"), ("floor", "floor", "ok"), ("absent", "peer", "skipped: not installed")]
    peer, floor, absent = rows
    assert peer.genflow_ms >= 3.0 and peer.baseline_ms < peer.genflow_ms
    assert peer.ratio == pytest.approx(peer.baseline_ms / peer.genflow_ms)
    assert peer.ahead == "NO" and floor.ahead == "-" and absent.ahead == "-"
    assert peer.rel_err == 0.0 and absent.genflow_ms is None
    table = bench.format_table(rows)
    assert "== fake: a fake group" in table and "double" in table and " NO " in table
    md = bench.markdown_table(rows)
    assert "**NO**" in md and md.count("\n") == 4  # header, rule, three rows


def test_disagreeing_peer_is_not_timed_and_fails_the_run(fake, tmp_path, capsys):
    fake(wrong_peer=True)
    rows = bench.run_cases(TINY, ["fake"], log=lambda line: None)
    assert rows[0].status == "DIFFERS" and rows[0].genflow_ms is None and rows[0].rel_err > 0.01
    code = bench.main(["--only", "fake", "--tiny", "--rounds", "1", "--no-results"])
    assert code == 1 and "DIFFERS" in capsys.readouterr().out


def test_json_schema(fake, tmp_path):
    fake()
    path = tmp_path / "out" / "bench.json"
    code = bench.main(["--only", "fake", "--tiny", "--rounds", "1", "--no-results", "--json", str(path)])
    assert code == 0
    doc = json.loads(path.read_text())
    assert doc["schema"] == bench.SCHEMA
    for key in ("created", "command", "machine", "copy_bandwidth_GBps", "wall_s", "rows", "groups"):
        assert key in doc
    for key in ("cpu_model", "cores", "torch", "device", "device_name", "extension", "peers"):
        assert key in doc["machine"]
    assert doc["copy_bandwidth_GBps"] > 0
    row = doc["rows"][0]
    for key in ("group", "case", "size", "baseline", "kind", "status", "genflow_ms", "baseline_ms", "ratio",
                "genflow_ahead", "max_err", "rel_err", "nfe_genflow", "nfe_baseline"):
        assert key in row
    assert row["group"] == "fake" and row["genflow_ahead"] in ("yes", "NO")


def test_results_markers_keep_history(fake, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## 2026-01-01 hand-written\n\nold numbers\n")
    fake()
    rows = bench.run_cases(TINY, ["fake"], log=lambda line: None)
    bench.update_results(path, "cpu", rows, header="HEADER ONE")
    first = path.read_text()
    assert first.startswith("# Benchmark results\n\n## 2026-01-01 hand-written\n\nold numbers\n")
    assert first.count(bench.BEGIN.format(key="cpu")) == 1 and "HEADER ONE" in first and "double" in first
    # another group is added beside it; the fake group's table stays
    other = [bench.Row("ops", "em_step", "1e3", "eager", "peer", "ok", 1.0, 2.0, 2.0)]
    bench.update_results(path, "cpu", other, header="HEADER TWO")
    second = path.read_text()
    assert "HEADER ONE" not in second and "HEADER TWO" in second
    assert "double" in second and "em_step" in second
    assert second.index("#### ops") < second.index("#### fake")  # registry order
    # a second run of the same group replaces its table; a different key gets its own block
    bench.update_results(path, "cpu", [bench.Row("ops", "dpm_step", "1e3", "eager", "peer", "ok")], header="H3")
    third = path.read_text()
    assert "dpm_step" in third and "em_step" not in third and "double" in third
    bench.update_results(path, "cuda", other, header="H4")
    fourth = path.read_text()
    assert fourth.count("<!-- genflow-bench:begin") == 2 and "old numbers" in fourth
    assert fourth.split(bench.END.format(key="cpu"))[0].endswith(third.split(bench.END.format(key="cpu"))[0][-200:])


def test_results_default_path(fake, tmp_path, monkeypatch, capsys):
    fake()
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--only", "fake", "--tiny", "--rounds", "1"]) == 0
    assert "results table not updated" in capsys.readouterr().out
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "RESULTS.md").write_text("# history\n")
    assert bench.main(["--only", "fake", "--tiny", "--rounds", "1", "--quick"]) == 0
    text = (tmp_path / "bench" / "RESULTS.md").read_text()
    assert text.startswith("# history\n") and bench.BEGIN.format(key="cpu quick") in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_unavailable_is_a_clear_error(capsys):
    assert bench.main(["--device", "cuda", "--no-results"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "CUDA is not available" in err


def test_cli_entry_points(capsys):
    parser = argparse.ArgumentParser(prog="genflow")
    sub = parser.add_subparsers(dest="command")
    bench.add_arguments(sub.add_parser("bench"))
    args = parser.parse_args(["bench", "--quick", "--only", "ops,torchsde", "--json", "x.json", "--no-results"])
    assert args.quick and args.json == "x.json" and bench._selected(args.only) == ["ops", "torchsde"]
    assert bench.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("ops", "k-diffusion", "diffusers", "torchdiffeq", "torchsde", "likelihood"):
        assert name in listed
    assert bench.main(["--only", "nope"]) == 2


def _first_case(group):
    return next(iter(bench.GROUPS[group].build(TINY)))


def test_op_rows_check_equal_work():
    case = _first_case("ops")
    eager = next(b for b in case.baselines if b.name == "eager")
    a = eager.check()
    assert a.ok and a.rel < 1e-5
    floor = next(b for b in case.baselines if b.kind == "floor")
    assert floor.check is None and "B/element" in floor.note


@pytest.mark.parametrize("group, index", [("k-diffusion", 2), ("diffusers", 0), ("diffusers", 1),
                                          ("torchsde", 3), ("torchdiffeq", 0)])
def test_peer_rows_compute_the_same_result(group, index):
    if group == "k-diffusion":
        k_diffusion_sampling()
    if group == "diffusers":
        diffusers()
    pytest.importorskip({"k-diffusion": "torchsde"}.get(group, group))
    case = next(itertools.islice(bench.GROUPS[group].build(TINY), index, None))
    (peer,) = case.baselines
    assert peer.fn is not None, peer.status
    a = peer.check()
    assert a.ok, (a.max_err, a.scale, a.tol)
    assert a.extra["nfe_genflow"] >= 10 and a.extra["nfe_peer"] >= a.extra["nfe_genflow"]
    if group in ("k-diffusion", "diffusers"):  # the timed callables themselves agree (no noise involved)
        ours, theirs = case.genflow(), peer.fn()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    if group == "torchdiffeq":
        assert a.extra["err_genflow"] < 0.05 * a.scale and a.extra["err_peer"] < 0.05 * a.scale



def test_likelihood_rows_check_equal_work():
    """The likelihood group at tiny size: every peer's log-likelihoods agree with genflow's to within
    their errors against the float64 reference, and the divergence estimate matches torch.func's."""
    logp_case, div_case = bench.GROUPS["likelihood"].build(TINY)
    names = [b.name for b in logp_case.baselines]
    assert names == ["score_sde-style scipy RK45", "flow_matching compute_likelihood"]
    ours = logp_case.genflow()
    assert ours.shape == (64,) and ours.dtype == torch.float64 and torch.isfinite(ours).all()
    for peer in logp_case.baselines:
        if peer.fn is None:  # flow_matching is optional
            assert peer.status == "skipped: flow_matching not installed"
            continue
        a = peer.check()
        assert a.ok, (peer.name, a.max_err, a.scale, a.tol)
        assert a.extra["nfe_genflow"] >= 10 and a.extra["nfe_peer"] >= 10
        assert a.extra["err_genflow"] < 1e-4 * a.scale and a.extra["err_peer"] < 1e-3 * a.scale
    plain, forward = div_case.baselines
    assert (plain.kind, forward.kind) == ("peer", "bound") and forward.check is None
    a = plain.check()
    assert a.ok and a.rel < 1e-5
    assert div_case.genflow().shape == (64,) and forward.fn().shape == (64, 2)


def test_likelihood_without_flow_matching_is_a_skipped_row(monkeypatch):
    from genflow import peers
    monkeypatch.setattr(peers, "optional", lambda name: None)
    case = _first_case("likelihood")
    fm = case.baselines[1]
    assert fm.fn is None and fm.status == "skipped: flow_matching not installed"
    assert case.baselines[0].fn is not None  # score_sde-style needs only scipy

def test_noise_law_detects_a_wrong_coefficient():
    n = 100_000
    g = torch.Generator().manual_seed(0)
    x, d, z = (torch.randn(n, generator=g) for _ in range(3))
    det = 0.95 * x + 0.03 * d
    assert noise_law(det + 0.2 * z, det, 0.2, [x, d]) < 6
    assert noise_law(det + 0.01 * x + 0.2 * z, det, 0.2, [x, d]) > 6


def test_agreement_and_timer():
    a = bench.agree(torch.ones(3), torch.ones(3) * (1 + 1e-7), 1e-6)
    assert a.ok and a.rel < 1e-6
    assert not bench.agree(torch.ones(3), torch.full((3,), float("nan")), 1e-6).ok
    assert not bench.agree(torch.ones(3), torch.ones(4), 1e-6).ok
    assert not Agreement(1.0, 1.0, 0.5).ok
    ms = bench.time_interleaved({"a": lambda: None, "b": lambda: time.sleep(0.002)}, TINY)
    assert ms["a"] < ms["b"] and ms["b"] >= 2.0


def test_solve_rows_check_equal_work():
    """The solve group at tiny size: every installed peer (torchdiffeq, torchsde; torchode and
    diffrax when present) agrees with gf.solve on the same problem (the same Brownian path for
    SDEs); missing peers are skipped rows, never errors."""
    checked = set()
    for case in itertools.islice(bench.GROUPS["solve"].build(TINY), 6):
        assert case.genflow().shape in ((1, 2), (64, 2))
        for peer in case.baselines:
            if peer.fn is None:
                assert peer.status.startswith("skipped: "), peer.status
                continue
            a = peer.check()
            assert a.ok, (case.name, peer.name, a.max_err, a.scale, a.tol)
            checked.add(peer.name.split()[0])
    installed = {name for name in ("torchdiffeq", "torchsde") if importlib.util.find_spec(name) is not None}
    assert installed <= checked
