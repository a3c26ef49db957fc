"""`genflow demo`, `genflow bench`, `genflow train` and `genflow sample` through the command line:
the table, the figure, and the errors (exit status 2 and a message naming the option or file for
bad counts, unwritable paths, corrupt or incomplete run.json, a checkpoint of another width, a
run directory of another configuration; status 1 for a run directory in use)."""
import json
import os
import shutil
import subprocess
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


# ---------------------------------------------------------------- genflow train / sample errors

TINY = ["--option", 'net_options={"hidden": 16, "layers": 2}']


def _train_argv(out, *extra):
    return ["train", "--family", "flow-matching", "--data", "moons", "--n", "256", "--steps", "3", "--batch-size",
            "32", "--out", str(out), "--no-progress", *TINY, *extra]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A three-step flow-matching run directory (copied by the tests that damage it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cli") / "fm"
    try:
        assert main(_train_argv(out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _exit_message(argv, capsys, code=2):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == code
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--n", "-5"], "--n must be >= 1, got -5"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
])
def test_sample_bad_counts_name_the_option(trained_run, tmp_path, extra, message, capsys):
    err = _exit_message(["sample", "--checkpoint", str(trained_run), "--out", str(tmp_path / "x.npy"), *extra],
                        capsys)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--n", "-3"], "--n must be >= 1, got -3"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--lr", "0"], "--lr must be > 0.0, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--ema", "1.5"], "--ema must be in [0, 1)"),
    (["--checkpoint-every", "-2"], "--checkpoint-every must be >= 0, got -2"),
])
def test_train_bad_counts_name_the_option(tmp_path, extra, message, capsys):
    err = _exit_message(_train_argv(tmp_path / "run", *extra), capsys)
    assert message in err
    assert not (tmp_path / "run" / "run.json").exists()


def test_sample_output_folders_are_created_and_bad_paths_named(trained_run, tmp_path, capsys):
    out, fig = tmp_path / "a" / "b" / "x", tmp_path / "c" / "d" / "f.png"
    assert main(["sample", "--checkpoint", str(trained_run), "--n", "7", "--steps", "2", "--out", str(out),
                 "--plot", str(fig)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}.npy" in printed and f"figure -> {fig}" in printed
    assert os.path.getsize(str(out) + ".npy") > 0 and fig.read_bytes().startswith(PNG)
    blocker = tmp_path / "file"
    blocker.write_text("")
    for option, path, message in (("--out", blocker / "x.npy", "cannot create the folder"),
                                  ("--plot", blocker / "f.png", "cannot create the folder"),
                                  ("--plot", tmp_path / "f.xyz", "--plot"),
                                  ("--out", tmp_path, "is a folder")):
        err = _exit_message(["sample", "--checkpoint", str(trained_run), "--n", "7", "--out",
                             str(tmp_path / "y.npy"), option, str(path)], capsys)
        assert message in err and f"{option} '{path}" in err and "saved" not in err
        assert not (tmp_path / "y.npy").exists()  # checked before sampling


@pytest.mark.parametrize("content, message", [
    ('{"family": "flow-matching", "opt', "is not a readable run file"),
    ("", "is not a readable run file"),
    ('["flow-matching"]', "must hold a JSON object"),
    ('{"family": "flow-matching"}', "is incomplete: it lacks ['options', 'data'"),
])
def test_corrupt_or_incomplete_run_json_is_named(trained_run, tmp_path, content, message, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "run.json").write_text(content)
    err = _exit_message(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "x.npy")], capsys)
    assert message in err and str(run / "run.json") in err and "Traceback" not in err
    # train into it: the same file is named
    assert str(run / "run.json") in _exit_message(_train_argv(run), capsys)


def test_a_checkpoint_of_another_width_is_named(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    saved = json.loads((run / "run.json").read_text())
    saved["options"]["net_options"]["hidden"] = 32
    (run / "run.json").write_text(json.dumps(saved))
    err = _exit_message(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "x.npy")], capsys)
    assert f"checkpoint '{run / 'checkpoint.pt'}' does not match the options in {run / 'run.json'}" in err
    assert "size mismatch" in err


def test_a_checkpoint_of_another_family_is_named(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    saved = json.loads((run / "run.json").read_text())
    saved["family"] = "rectified-flow"  # the same networks: the weights would load without a word
    (run / "run.json").write_text(json.dumps(saved))
    err = _exit_message(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "x.npy")], capsys)
    assert f"checkpoint '{run / 'checkpoint.pt'}' holds family 'flow-matching', but {run / 'run.json'} " \
           "describes 'rectified-flow'" in err


@pytest.mark.parametrize("extra, message", [
    (["--family", "rectified-flow"], "--family (family): the run directory has 'flow-matching', this run "
                                     "'rectified-flow'"),
    (["--option", "sigma_min=0.01"], "--option sigma_min: the run directory has '(unset)', this run 0.01"),
    (["--option", 'net_options={"hidden": 32, "layers": 2}'], "--option net_options"),
    (["--seed", "1"], "--seed (seed): the run directory has 0, this run 1"),
    (["--no-resume", "--data", "circles"], "--data (data)"),
])
def test_train_into_a_run_of_another_configuration_is_refused(trained_run, tmp_path, extra, message, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "run.json").read_text(), (run / "checkpoint.pt").read_bytes()
    argv = _train_argv(run)
    if "--family" in extra:
        argv[argv.index("--family") + 1] = extra[1]
        extra = []
    err = _exit_message(argv + extra, capsys)
    assert f"run directory '{run}' belongs to another configuration" in err and message in err
    assert ((run / "run.json").read_text(), (run / "checkpoint.pt").read_bytes()) == before


def test_train_into_a_run_directory_in_use_exits_1(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "train.lock").write_text(f"{holder.pid}\n")
        assert main(_train_argv(run, "--steps", "5")) == 1
        err = capsys.readouterr().err
        assert f"genflow train: error: run directory '{run}' is in use by another trainer (process {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(_train_argv(run, "--steps", "5")) == 0  # a dead holder's lock is taken over
    assert not (run / "train.lock").exists()


def test_train_on_data_with_a_nan_row_names_the_row(tmp_path, capsys):
    import numpy as np

    x = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    x[9, 1] = np.nan
    np.save(tmp_path / "bad.npy", x)
    argv = _train_argv(tmp_path / "run")
    argv[argv.index("--data") + 1] = str(tmp_path / "bad.npy")
    del argv[argv.index("--n"):argv.index("--n") + 2]
    err = _exit_message(argv + ["--on-nonfinite", "skip"], capsys)
    assert "data set 'bad' has non-finite values (NaN/Inf) in 1 of 40 rows; the first is row 9" in err
    assert not (tmp_path / "run" / "run.json").exists()


def test_train_into_an_unwritable_folder_and_sample_from_a_missing_run_are_named(trained_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _exit_message(_train_argv(blocker / "run"), capsys)
    assert f"--out: cannot create the folder '{blocker / 'run'}'" in err and "Traceback" not in err
    err = _exit_message(["sample", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x.npy")], capsys)
    assert f"'{tmp_path / 'none'}' is not a genflow train run directory (no run.json)" in err
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "checkpoint.pt").unlink()
    err = _exit_message(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "x.npy")], capsys)
    assert "checkpoint" in err and str(run) in err and "Traceback" not in err
    assert not (tmp_path / "x.npy").exists()
