"""The trainer: optimisation, EMA, schedule, clipping, exact resume, safe checkpoints, data parallelism."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import genflow.ops
from genflow.train import (CheckpointError, Dataset, TrainConfig, learning_rate, load_checkpoint, load_latest,
                           sample_plotter, sample_seeds, save_checkpoint, train)
from genflow.checkpoint import FORMAT
from genflow.train.trainer import plot_samples


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TinyFamily:
    """A regression "family": fit ``y = f(x)`` with a one-hidden-layer net; noise from per-sample seeds."""

    name = "tiny"
    phases = ("main",)

    def __init__(self, init_seed: int = 0, dim: int = 3, hidden: int = 8):
        gen = torch.Generator().manual_seed(init_seed)
        self.modules = nn.ModuleDict({"net": nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))})
        with torch.no_grad():
            for p in self.modules.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))

    def parameters(self, phase):
        return list(self.modules.parameters())

    def loss(self, phase, batch, *, labels=None, seeds):
        x, y = batch[:, :-1], batch[:, -1:]
        noise = genflow.ops.randn((batch.shape[0], 1), seed=seeds)
        return ((self.modules["net"](x) - y - 0.1 * noise) ** 2).mean()

    def sample(self, n, *, generator=None, labels=None):
        return torch.randn(n, 2, generator=generator)

    def log_likelihood(self, x):
        return None

    def state_dict(self):
        return self.modules.state_dict()

    def load_state_dict(self, state):
        self.modules.load_state_dict(state)


class TwoPhaseFamily(TinyFamily):
    """Two phases (as a GAN's), each with its own optimiser over one layer."""

    phases = ("first", "second")

    def parameters(self, phase):
        return list(self.modules["net"][0 if phase == "first" else 2].parameters())


def make_data(n: int = 256) -> Dataset:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(n, 3, generator=gen)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5]])) + 0.5
    return Dataset(torch.cat([x, y], dim=1), name="regression")


def config(**kw):
    base = dict(steps=20, batch_size=8, lr=1e-2, warmup=3, decay="cosine", grad_clip=1.0, ema=0.9, seed=7,
                log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def params(family):
    return {k: v.detach().clone() for k, v in family.modules.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_decreases():
    family = TinyFamily()
    result = train(family, make_data(), config(steps=150, batch_size=32, lr=3e-2, warmup=10), progress=False)
    curve = result.losses["main"]
    assert curve.shape == (150,) and torch.isfinite(curve).all()
    assert curve[-20:].mean() < 0.2 * curve[:10].mean()


def test_per_sample_seeds_depend_on_row_only():
    full = sample_seeds(3, 5, 0, 0, 8)
    assert torch.equal(torch.cat([sample_seeds(3, 5, 0, 0, 4), sample_seeds(3, 5, 0, 4, 8)]), full)
    assert full.dtype == torch.int64 and (full >= 0).all() and full.unique().numel() == 8
    assert not torch.equal(sample_seeds(3, 6, 0, 0, 8), full)
    assert not torch.equal(sample_seeds(3, 5, 1, 0, 8), full)


def test_ema_equals_hand_computed():
    seen = []

    class Recording(TinyFamily):
        def loss(self, phase, batch, *, labels=None, seeds):
            seen.append(torch.nn.utils.parameters_to_vector(self.modules.parameters()).detach().clone())
            return super().loss(phase, batch, labels=labels, seeds=seeds)

    family = Recording()
    result = train(family, make_data(), config(steps=6, ema=0.8), progress=False)
    seen.append(torch.nn.utils.parameters_to_vector(family.modules.parameters()).detach())
    ema = seen[0].clone()
    for theta in seen[1:]:
        ema = 0.8 * ema + 0.2 * theta
    got = torch.cat([result.ema.shadow[name].flatten() for name, _ in family.modules.named_parameters()])
    torch.testing.assert_close(got, ema, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got, seen[-1])  # the average differs from the last weights
    with result.ema.applied(family.modules):
        assert torch.equal(torch.nn.utils.parameters_to_vector(family.modules.parameters()), got)
    assert torch.equal(torch.nn.utils.parameters_to_vector(family.modules.parameters()), seen[-1])


@pytest.mark.parametrize("num_classes", [None, 3])
def test_labels_reach_conditional_families_only(num_classes):
    seen = []

    class Labelled(TinyFamily):
        def loss(self, phase, batch, *, labels=None, seeds):
            seen.append(labels)
            return super().loss(phase, batch, labels=labels, seeds=seeds)

    family = Labelled()
    family.num_classes = num_classes
    data = make_data()
    data.labels = torch.arange(len(data)) % 3
    train(family, data, config(steps=2), progress=False)
    if num_classes is None:
        assert seen == [None, None]
    else:
        x, y = data.batch(8, generator=torch.Generator().manual_seed(7))
        assert torch.equal(seen[0], y)


def test_learning_rate_schedule(tmp_path):
    cfg = config(steps=20, warmup=4, lr=1.0)
    assert [learning_rate(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 4) == 1.0
    assert learning_rate(cfg, 12) == pytest.approx(0.5)           # p = 8/16: (1 + cos(pi/2))/2
    assert learning_rate(cfg, 19) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    lin = config(steps=20, warmup=4, lr=1.0, decay="linear")
    assert learning_rate(lin, 12) == pytest.approx(0.5) and learning_rate(lin, 19) == pytest.approx(1 / 16)
    assert learning_rate(config(steps=20, warmup=0, decay="constant"), 17) == 1e-2
    # the optimiser really runs at those rates (the metrics log records them)
    train(TinyFamily(), make_data(), cfg, checkpoint_dir=str(tmp_path), progress=False)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["lr"] for r in records] == [learning_rate(cfg, s) for s in range(20)]


def test_gradient_clipping(tmp_path):
    data, clip = make_data(), 1e-3
    cfg = config(steps=1, grad_clip=clip, warmup=0, decay="constant")
    family = TinyFamily()
    # the gradient of the first step, by hand
    x, _ = data.batch(cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed))
    reference = TinyFamily()
    reference.loss("main", x, seeds=sample_seeds(cfg.seed, 0, 0, 0, cfg.batch_size)).backward()
    raw = torch.cat([p.grad.flatten() for p in reference.modules.parameters()])
    assert raw.norm() > 100 * clip
    train(family, data, cfg, checkpoint_dir=str(tmp_path), progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")["optimizers"]["main"]["state"]
    # Adam's first moment after one step is (1 - beta1) * the (clipped) gradient
    m = torch.cat([state[i]["exp_avg"].flatten() for i in range(len(state))]) / (1 - cfg.betas[0])
    torch.testing.assert_close(m, raw * clip / raw.norm(), rtol=1e-4, atol=1e-9)
    record = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert record["grad_norm/main"] == pytest.approx(float(raw.norm()), rel=1e-5)


@pytest.mark.parametrize("family_cls", [TinyFamily, TwoPhaseFamily])
def test_exact_resume_bitwise(tmp_path, family_cls):
    data, cfg = make_data(), config(steps=20, checkpoint_every=5, eval_every=1)
    full = train(family_cls(), data, cfg, progress=False)

    def interrupt(family, step):
        if step == 11:
            raise KeyboardInterrupt
        return {"step_seen": step}

    with pytest.raises(KeyboardInterrupt):
        train(family_cls(), data, cfg, checkpoint_dir=str(tmp_path), evaluate=interrupt, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 10
    fresh = family_cls(init_seed=99)  # other weights: everything must come from the checkpoint
    resumed = train(fresh, data, cfg, checkpoint_dir=str(tmp_path), evaluate=lambda f, s: {"step_seen": s},
                    progress=False)
    assert resumed.step == 20 and [m["step"] for m in resumed.metrics] == list(range(1, 21))
    assert_same(params(fresh), params(full.family))
    assert_same(resumed.ema.shadow, full.ema.shadow)
    assert resumed.losses.keys() == set(family_cls.phases)
    for phase in family_cls.phases:
        assert torch.equal(resumed.losses[phase], full.losses[phase])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl") if "eval" not in line]
    assert steps == list(range(1, 21))  # the log has no duplicated steps after the resume


def test_resume_rejects_changed_settings(tmp_path):
    train(TinyFamily(), make_data(), config(steps=4), checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(TinyFamily(), make_data(), config(steps=8, lr=0.5), checkpoint_dir=str(tmp_path), progress=False)


SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from tests.train.test_trainer import TinyFamily, make_data, config
from genflow.train import train
train(TinyFamily(), make_data(), config(steps=60, checkpoint_every=1, eval_every=1),
      checkpoint_dir={ckpt!r}, evaluate=lambda f, s: time.sleep(0.05) or {{}}, progress=False)
"""


def test_resume_after_kill_9(tmp_path):
    ckpt = str(tmp_path / "run")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(repo=REPO, ckpt=ckpt))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(ckpt, "checkpoint.pt")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the training subprocess wrote no checkpoint"
        time.sleep(0.01)
    time.sleep(0.3)
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    assert proc.returncode == -9
    state, _ = load_latest(ckpt)
    assert 1 <= state["step"] < 60
    with open(os.path.join(ckpt, "metrics.jsonl"), "a") as f:  # as if killed in the middle of a log line
        f.write('{"step": 59, "lo')
    open(os.path.join(ckpt, "checkpoint.pt.abc.tmp"), "wb").close()  # as if killed in the middle of a save
    cfg = config(steps=60, checkpoint_every=1, eval_every=1)
    resumed = TinyFamily(init_seed=5)
    result = train(resumed, make_data(), cfg, checkpoint_dir=ckpt, progress=False)
    full = train(TinyFamily(), make_data(), cfg, progress=False)
    assert_same(params(resumed), params(full.family))
    assert torch.equal(result.losses["main"], full.losses["main"])
    steps = [json.loads(line)["step"] for line in open(os.path.join(ckpt, "metrics.jsonl")) if "eval" not in line]
    assert steps == list(range(1, 61))
    assert not [f for f in os.listdir(ckpt) if f.endswith(".tmp")]


def test_truncated_or_corrupted_checkpoint_falls_back(tmp_path):
    cfg = config(steps=6, checkpoint_every=2)
    train(TinyFamily(), make_data(), cfg, checkpoint_dir=str(tmp_path), progress=False)
    path = tmp_path / "checkpoint.pt"
    assert load_checkpoint(path)["step"] == 6 and load_checkpoint(str(path) + ".prev")["step"] == 4
    good = path.read_bytes()
    for broken in (good[: len(good) // 2], good[:100] + bytes(b ^ 0xFF for b in good[100:400]) + good[400:]):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError, match="checkpoint.pt"):
            load_checkpoint(path)
        with pytest.warns(RuntimeWarning, match="previous checkpoint"):
            state, used = load_latest(tmp_path)
        assert used.endswith(".prev") and state["step"] == 4
    # resume=True continues from .prev (step 4) and ends where the uninterrupted run ends
    family = TinyFamily(init_seed=3)
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        train(family, make_data(), config(steps=8, checkpoint_every=2), checkpoint_dir=str(tmp_path), progress=False)
    assert_same(params(family), params(train(TinyFamily(), make_data(), config(steps=8), progress=False).family))


def test_wrong_version_and_foreign_files(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": FORMAT, "version": 99}, path)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt.*version 99"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a genflow training checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(path, {"step": 3, "x": torch.arange(3)})
    assert load_checkpoint(path)["step"] == 3 and os.path.exists(str(path) + ".prev")  # the old file is kept


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    unsafe_marker, marker = tmp_path / "pwned_unsafe", tmp_path / "pwned"
    torch.save({"format": FORMAT, "version": 1, "x": _Payload(str(unsafe_marker))}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert unsafe_marker.exists()
    torch.save({"format": FORMAT, "version": 1, "x": _Payload(str(marker))}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError):
        train(TinyFamily(), make_data(), config(steps=2), checkpoint_dir=str(tmp_path), progress=False)
    assert not marker.exists()


def test_bf16_and_bad_arguments(tmp_path):
    result = train(TinyFamily(), make_data(), config(steps=3, bf16=True), progress=False)
    fp32 = train(TinyFamily(), make_data(), config(steps=3), progress=False)
    assert torch.isfinite(result.losses["main"]).all()
    assert not torch.equal(result.losses["main"], fp32.losses["main"])
    with pytest.raises(ValueError, match="decay"):
        config(decay="exp")
    with pytest.raises(ValueError, match="steps"):
        config(steps=0)
    with pytest.raises(TypeError, match="training interface"):
        train(object(), make_data(), config(), progress=False)
    with pytest.raises(TypeError, match="dict of numbers"):
        train(TinyFamily(), make_data(), config(steps=1, eval_every=1), evaluate=lambda f, s: 1.0, progress=False)


@pytest.mark.filterwarnings("error::DeprecationWarning")  # matplotlib's on torch's __array__ under NumPy 2
def test_sample_plotter(tmp_path):
    pytest.importorskip("matplotlib")
    train(TinyFamily(), make_data(), config(steps=2, eval_every=2), evaluate=sample_plotter(str(tmp_path), n=64),
          progress=False)
    assert (tmp_path / "samples_0000002.png").stat().st_size > 1000
    for channels in (1, 3):
        path = plot_samples(torch.rand(5, channels, 8, 8) * 2 - 1, str(tmp_path / f"grid{channels}.png"))
        assert os.path.getsize(path) > 1000


def _ddp_worker(rank, world, init_file, ckpt, cfg_kwargs):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:  # rank 0's initial weights must win (broadcast); only rank 0 writes the checkpoint
        train(TinyFamily(init_seed=rank + 1), make_data(), TrainConfig(**cfg_kwargs), checkpoint_dir=ckpt,
              progress=False)
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_equals_single_process(tmp_path):
    cfg_kwargs = dict(steps=5, batch_size=8, lr=1e-2, warmup=2, grad_clip=None, ema=0.9, seed=11, log_every=1)
    # fork: the workers need not re-import torch (spawn would work the same, seconds slower)
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"),
                                                             cfg_kwargs), nprocs=2, start_method="fork")
    train(TinyFamily(init_seed=1), make_data(), TrainConfig(**cfg_kwargs), checkpoint_dir=str(tmp_path / "one"),
          progress=False)
    got, want = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt"), load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert not torch.allclose(want["family"]["net.0.weight"], TinyFamily(init_seed=1).modules["net"][0].weight)
    close = dict(rtol=1e-6, atol=1e-6)
    for k in want["family"]:
        torch.testing.assert_close(got["family"][k], want["family"][k], **close)
        torch.testing.assert_close(got["ema"]["shadow"][k], want["ema"]["shadow"][k], **close)
    for i, moments in want["optimizers"]["main"]["state"].items():  # Adam's moments see the averaged gradient
        torch.testing.assert_close(got["optimizers"]["main"]["state"][i]["exp_avg"], moments["exp_avg"], **close)
        torch.testing.assert_close(got["optimizers"]["main"]["state"][i]["exp_avg_sq"], moments["exp_avg_sq"],
                                   rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(got["losses"]["main"], want["losses"]["main"], rtol=1e-6, atol=1e-7)
    assert len(open(tmp_path / "ddp" / "metrics.jsonl").readlines()) == 5  # one writer
