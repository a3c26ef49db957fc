"""Checkpoint safety (issue 8): safe loads, refused pickles, broken files, versions, atomic writes.

The trainer's own resume tests are in test_trainer.py; these cover the shared loop-state
helpers of ``train_cnf`` and ``train_sd_generator`` and kill the writer in the middle of a save.
"""
import ast
import os
import signal
import subprocess
import sys

import pytest
import torch

import genflow as gf
from genflow.checkpoint import (FORMAT, VERSION, CheckpointError, load_checkpoint, load_latest,
                                      resume_loop_state, save_checkpoint, save_loop_state)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))


def _loop(seed=0):
    net = gf.CNFNet(2, hidden=8, depth=1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return net, torch.optim.Adam(net.parameters(), lr=1e-3), torch.Generator().manual_seed(seed)


def _train_cnf(path, steps=2):
    return gf.train_cnf(gf.CNFNet(2, hidden=8, depth=1), DATA, steps=steps, batch=8, solve_steps=1, generator=0,
                        checkpoint=path, checkpoint_every=1, progress=False)


def test_every_torch_load_in_genflow_is_weights_only():
    calls = []
    for root, _, files in os.walk(os.path.join(REPO, "genflow")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                tree = ast.parse(open(path).read(), path)
                calls += [(path, node) for node in ast.walk(tree) if isinstance(node, ast.Call)
                          and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                          and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]
    assert calls, "no torch.load found: the scan is broken"
    unsafe = [f"{path}:{node.lineno}" for path, node in calls
              if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)]
    assert not unsafe


def test_loop_state_round_trip_and_fallback(tmp_path):
    path = tmp_path / "loop.pt"
    assert resume_loop_state(path, *_loop()) == (0, [])
    net, opt, rng = _loop(1)
    save_loop_state(path, net, opt, rng, 3, [1.0, 0.5, 0.25])
    save_loop_state(path, net, opt, rng, 4, [1.0, 0.5, 0.25, 0.125])
    other = _loop(2)
    assert resume_loop_state(path, *other) == (4, [1.0, 0.5, 0.25, 0.125])
    assert all(torch.equal(a, b) for a, b in zip(other[0].parameters(), net.parameters()))
    assert torch.equal(other[2].get_state(), rng.get_state())
    path.write_bytes(path.read_bytes()[:200])  # truncated: the previous file (step 3) is used
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        assert resume_loop_state(path, *_loop())[0] == 3
    save_checkpoint(tmp_path / "other.pt", {"step": 1})
    with pytest.raises(CheckpointError, match=r"other\.pt.*lacks \['net', 'optimizer', 'rng', 'history'\]"):
        resume_loop_state(tmp_path / "other.pt", *_loop())


def test_cnf_checkpoint_truncated_corrupted_or_wrong_version(tmp_path):
    path = tmp_path / "cnf.pt"
    _train_cnf(path)
    os.remove(str(path) + ".prev")   # no fallback: the error must name the file and the problem
    good = path.read_bytes()
    for broken in (good[: len(good) // 2], good[:100] + bytes(b ^ 0xFF for b in good[100:600]) + good[600:]):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError, match=r"cnf\.pt.*(truncated or corrupted|refused)"):
            _train_cnf(path, steps=4)
    torch.save({"format": FORMAT, "version": VERSION + 1}, path)
    expected = rf"cnf\.pt.* has version {VERSION + 1}; this genflow reads version {VERSION}"
    with pytest.raises(CheckpointError, match=expected):
        _train_cnf(path, steps=4)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("trainer", ["cnf", "sdflow"])
def test_cnf_and_sdflow_refuse_a_malicious_checkpoint(tmp_path, trainer):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    torch.save({"format": FORMAT, "version": VERSION, "net": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused"):
        if trainer == "cnf":
            _train_cnf(path)
        else:
            gf.train_sd_generator(gf.sdflow.MLPGenerator(2, 2, hidden=8, depth=1), DATA, sigma=1.0, steps=2,
                                  batch_size=8, generator=0, checkpoint=path, checkpoint_every=1)
    assert not marker.exists()


KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch
from genflow import checkpoint
path = {path!r}
checkpoint.save_checkpoint(path, {{"step": 1, "x": torch.zeros(1000)}})
if {where!r} == "write":
    def save(obj, f):        # a slow writer: part of the file, then the process is killed
        f.write(b"PK" + bytes(4096)); f.flush()
        print("writing", flush=True); time.sleep(60)
    torch.save = save
else:
    replace = os.replace
    def slow_replace(src, dst):  # killed between moving the old file to .prev and the new one into place
        replace(src, dst)
        if dst.endswith(".prev"):
            print("writing", flush=True); time.sleep(60)
    os.replace = slow_replace
checkpoint.save_checkpoint(path, {{"step": 2, "x": torch.ones(1000)}})
"""


@pytest.mark.parametrize("where", ["write", "rename"])
def test_writer_killed_mid_save_leaves_the_previous_checkpoint(tmp_path, where):
    path = str(tmp_path / "checkpoint.pt")
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER.format(repo=REPO, path=path, where=where))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line == b"writing\n", proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state, used = load_latest(tmp_path)
    assert state["step"] == 1 and torch.equal(state["x"], torch.zeros(1000))
    assert used == (path if where == "write" else path + ".prev")
    if where == "write":   # the half-written temporary file is never the latest checkpoint
        assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        assert load_checkpoint(path)["step"] == 1
