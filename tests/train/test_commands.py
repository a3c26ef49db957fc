"""genflow train / sample from the command line: a run directory with run.json, checkpoints,
metrics log and a figure; sampling rebuilds the family from it; a second train call resumes."""
import json
import os

import numpy as np
import pytest
import torch

from genflow.cli import main
from genflow.train.commands import load_run


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(out, steps, *extra):
    return main(["train", "--family", "flow-matching", "--data", "moons", "--n", "512", "--steps", str(steps),
                 "--batch-size", "64", "--checkpoint-every", "5", "--out", str(out), "--no-progress",
                 "--option", 'net_options={"hidden": 32, "layers": 2}', *extra])


def test_train_then_sample(tmp_path, capsys):
    out = tmp_path / "fm"
    assert _train(out, 10) == 0
    printed = capsys.readouterr().out
    assert "sample quality: mmd" in printed and "kl_kde_grid" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["family"] == "flow-matching" and run["data_shape"] == [2]
    assert {"checkpoint.pt", "metrics.jsonl", "samples.png"} <= set(os.listdir(out))
    family, _ = load_run(str(out))
    assert main(["sample", "--checkpoint", str(out), "--n", "50", "--steps", "4", "--out", str(tmp_path / "x.npy"),
                 "--plot", str(tmp_path / "x.png")]) == 0
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (50, 2) and np.isfinite(x).all() and (tmp_path / "x.png").exists()
    # the same seed, solver and steps give the same samples as the loaded family
    expect = family.sample(50, generator=0, steps=4).numpy()
    np.testing.assert_array_equal(x, expect)


def test_a_second_call_resumes_and_equals_an_uninterrupted_run(tmp_path):
    assert _train(tmp_path / "a", 20) == 0
    (tmp_path / "a" / "checkpoint.pt").unlink()  # as if killed after the step-15 checkpoint
    assert (tmp_path / "a" / "checkpoint.pt.prev").exists()
    assert _train(tmp_path / "a", 20) == 0       # resumes from step 15
    assert _train(tmp_path / "b", 20) == 0       # uninterrupted
    ta = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    tb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ta["step"] == tb["step"] == 20
    for key, value in tb["family"].items():
        assert torch.equal(ta["family"][key], value), key


@pytest.mark.parametrize("argv, message", [
    (["train", "--family", "flow-matchin", "--data", "moons"], "did you mean"),
    (["train", "--family", "diffusion", "--data", "moonz"], "moons"),
    (["train", "--family", "diffusion", "--option", "nonsense"], "key=value"),
    (["train", "--family", "diffusion", "--option", "hiden=3"], "unknown option 'hiden'"),
    (["sample", "--checkpoint", "/nonexistent/run"], "not a genflow train run directory"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
