"""`genflow demo` and `genflow bench` through the command line: the table, the figure, the errors."""
import sys
import types

import pytest

from genflow import peers
from genflow.cli import main
from genflow.demo import K_DIFFUSION, QUICK, SOLVERS

PNG = b"\x89PNG\r\n\x1a\n"


def _table(printed: str) -> dict:
    """``{(model, solver, steps): columns}`` from the demo's printed table."""
    rows = {}
    for line in printed.splitlines():
        parts = line.split()
        if len(parts) == 9 and parts[1] in SOLVERS:
            model, solver, steps, nfe, ms, mmd2, kl, k_ms, speed = parts
            rows[model, solver, steps] = {"nfe": int(nfe), "ms": float(ms), "mmd2": float(mmd2),
                                          "kl": float(kl), "k_ms": k_ms, "speed": speed}
    return rows


def _expected_keys(model):
    steps = [str(s) for s in QUICK["steps"]]
    return {(model, s, n) for s in SOLVERS if s != "rk45" for n in steps} | {(model, "rk45", "adaptive")}


def test_quick_demo_trains_both_models_and_saves_the_figure(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _table(printed)
    assert set(rows) == _expected_keys("flow") | _expected_keys("edm")
    assert "trained flow" in printed and "trained edm" in printed
    assert "data (fresh sample of the mixture)" in printed and f"saved figure: {out}" in printed
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 50_000
    for (model, solver, steps), row in rows.items():
        if steps != "adaptive":
            assert row["nfe"] == {"heun": 2 * int(steps) - (model == "flow")}.get(solver, int(steps))
    # 150 training steps give a rough model; a sampler returning noise scores MMD^2 > 1
    assert rows["flow", "heun", "10"]["mmd2"] < 0.4
    assert rows["edm", "dpmpp_2m", "10"]["mmd2"] < 0.4
    # k-diffusion runs only on the EDM model (LinearPath has alpha(T) = 0) and only where it has the solver
    installed = peers.k_diffusion_sampling() is not None
    for (model, solver, _), row in rows.items():
        has_peer = installed and model == "edm" and solver in K_DIFFUSION
        assert (row["speed"] != "—") == has_peer
        if has_peer:
            assert row["speed"].endswith("x") and float(row["k_ms"]) > 0


@pytest.mark.parametrize("process", ["vp", "edm", "linear"])
def test_quick_demo_without_training_samples_the_exact_mixture(process, tmp_path, capsys):
    out = tmp_path / "exact.png"
    assert main(["demo", "--quick", "--no-train", "--process", process, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _table(printed)
    assert set(rows) == _expected_keys(f"exact-{process}")
    assert "trained" not in printed
    assert out.read_bytes()[:8] == PNG
    # the best solvers come close to the data (noise-like samples score MMD^2 ~ 1, KL ~ 16)
    assert min(r["mmd2"] for r in rows.values()) < 0.01
    assert min(r["kl"] for r in rows.values()) < 0.4
    assert rows[f"exact-{process}", "rk45", "adaptive"]["mmd2"] < 0.03
    if peers.k_diffusion_sampling() is not None:
        assert (rows[f"exact-{process}", "euler", "5"]["speed"] == "—") == (process == "linear")


def test_demo_is_deterministic_given_the_seed(capsys):
    def metrics(seed):
        main(["demo", "--quick", "--no-train", "--process", "edm", "--seed", str(seed), "--out", ""])
        return {k: (r["mmd2"], r["kl"]) for k, r in _table(capsys.readouterr().out).items()}

    first = metrics(3)
    assert metrics(3) == first
    assert metrics(4) != first


def test_demo_steps_option_sets_the_rows(capsys):
    assert main(["demo", "--no-train", "--n", "64", "--steps", "3,1,3", "--out", ""]) == 0
    rows = _table(capsys.readouterr().out)
    assert {k[2] for k in rows} == {"1", "3", "adaptive"}


@pytest.mark.parametrize("argv, message", [
    (["demo", "--process", "edm"], "--process applies only with --no-train"),
    (["demo", "--no-train", "--train-steps", "5"], "--train-steps has no effect"),
    (["demo", "--n", "0"], "must be >= 1"),
    (["demo", "--n", "4"], "--n must be >= 8"),
    (["demo", "--n", "many"], "expected an integer"),
    (["demo", "--steps", "5,x"], "expected an integer"),
    (["demo", "--steps", ","], "expected comma-separated step counts"),
    (["demo", "--train-steps", "-3"], "must be >= 1"),
    (["demo", "--process", "ve", "--no-train"], "invalid choice"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "required: command"),
])
def test_argument_errors_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_subcommand_delegates_to_genflow_bench(monkeypatch, capsys):
    calls = []

    def add_arguments(parser):
        parser.add_argument("--repeat", type=int, default=1)

    def run(args):
        calls.append(args)
        return 7

    fake = types.ModuleType("genflow.bench", "Fake benchmarks.")
    fake.add_arguments, fake.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "genflow.bench", fake)
    assert main(["bench", "--repeat", "3"]) == 7
    assert calls[0].repeat == 3
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--help"])
    assert raised.value.code == 0
    printed = capsys.readouterr().out
    assert "usage: genflow bench" in printed and "--repeat" in printed and "Fake benchmarks." in printed
