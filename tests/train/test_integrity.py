"""Training integrity: a run directory belongs to one family and one network shape, a second
trainer is refused by the lock file (stale locks taken over), a non-finite loss or gradient norm
stops training naming the step (or is skipped on request) with the last finite checkpoint kept,
non-finite weights are never saved or returned, data with NaN/Inf rows is refused naming the
first bad row, and the trainer's numbers may be NumPy or 0-d tensor numbers."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from genflow.errors import NonFiniteError
from genflow.train import CheckpointError, Dataset, TrainConfig, load_checkpoint, load_dataset, train
from genflow.checkpoint import LOCK_NAME, RunLockedError, run_lock
from tests.train.test_trainer import REPO, TinyFamily, make_data


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**kw):
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup=0, grad_clip=1.0, ema=0.9, seed=3, log_every=1,
                checkpoint_every=2)
    base.update(kw)
    return TrainConfig(**base)


class OtherFamily(TinyFamily):
    name = "other"


class PoisonedFamily(TinyFamily):
    """TinyFamily whose loss is NaN (or ``scale`` times the loss) on the optimiser steps in ``bad``."""

    def __init__(self, bad=(), value=math.nan, **kw):
        super().__init__(**kw)
        self.bad, self.value, self.calls = set(bad), value, 0

    def loss(self, phase, batch, *, labels=None, seeds):
        self.calls += 1
        loss = super().loss(phase, batch, labels=labels, seeds=seeds)
        return loss * self.value if self.calls in self.bad else loss


def _finite(family):
    return all(bool(torch.isfinite(p).all()) for p in family.modules.parameters())


# ---------------------------------------------------------------- one configuration per run directory

def test_a_checkpoint_of_another_family_is_refused(tmp_path):
    train(TinyFamily(), make_data(), config(), checkpoint_dir=str(tmp_path), progress=False)
    for resume in (True, False):
        with pytest.raises(CheckpointError, match=r"holds a checkpoint of family 'tiny'.*trains family 'other'"):
            train(OtherFamily(), make_data(), config(), checkpoint_dir=str(tmp_path), resume=resume, progress=False)
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["family_name"] == "tiny"  # untouched


def test_weights_of_another_width_are_refused_naming_the_checkpoint(tmp_path):
    train(TinyFamily(hidden=8), make_data(), config(), checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*do not fit.*size mismatch"):
        train(TinyFamily(hidden=16), make_data(), config(steps=8), checkpoint_dir=str(tmp_path), progress=False)
    # resume=False restarts the same family explicitly, whatever its width
    result = train(TinyFamily(hidden=16), make_data(), config(), checkpoint_dir=str(tmp_path), resume=False,
                   progress=False)
    assert result.step == 6 and load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 6


def test_resuming_the_same_configuration_still_works(tmp_path):
    train(TinyFamily(), make_data(), config(steps=4, decay="constant"), checkpoint_dir=str(tmp_path), progress=False)
    resumed = train(TinyFamily(), make_data(), config(steps=6, decay="constant"), checkpoint_dir=str(tmp_path),
                    progress=False)
    full = train(TinyFamily(), make_data(), config(steps=6, decay="constant"), progress=False)
    assert torch.equal(resumed.losses["main"], full.losses["main"])


# ---------------------------------------------------------------- the lock file

def test_a_second_trainer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    run = str(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(run)
        with open(os.path.join(run, LOCK_NAME), "w") as f:
            f.write(f"{sleeper.pid}\n")
        with pytest.raises(RunLockedError, match=rf"run directory '{run}' is in use by another trainer "
                                                 rf"\(process {sleeper.pid}"):
            train(TinyFamily(), make_data(), config(), checkpoint_dir=run, progress=False)
        assert not os.path.exists(os.path.join(run, "checkpoint.pt"))
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone (as after SIGKILL): its lock is taken over, and released at the end
    result = train(TinyFamily(), make_data(), config(), checkpoint_dir=run, progress=False)
    assert result.step == 6 and not os.path.exists(os.path.join(run, LOCK_NAME))


def test_a_trainer_in_another_process_is_refused_while_one_trains(tmp_path):
    run = str(tmp_path / "run")
    script = (f"import sys; sys.path.insert(0, {REPO!r})\n"
              "from tests.train.test_integrity import config\n"
              "from tests.train.test_trainer import TinyFamily, make_data\n"
              "from genflow.train import train\n"
              f"train(TinyFamily(), make_data(), config(), checkpoint_dir={run!r}, progress=False)\n")
    with run_lock(run):  # what a running trainer holds; re-entrant for this process
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode != 0 and "RunLockedError" in res.stderr and run in res.stderr
        with open(os.path.join(run, LOCK_NAME)) as f:
            assert int(f.read()) == os.getpid()
        assert train(TinyFamily(), make_data(), config(), checkpoint_dir=run, progress=False).step == 6
        assert os.path.exists(os.path.join(run, LOCK_NAME))  # the outer holder keeps it
    assert not os.path.exists(os.path.join(run, LOCK_NAME))


def test_an_empty_lock_file_is_refused_naming_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(RunLockedError, match=r"train\.lock.*names no process"):
        train(TinyFamily(), make_data(), config(), checkpoint_dir=str(tmp_path), progress=False)


# ---------------------------------------------------------------- non-finite losses and weights

@pytest.mark.parametrize("value, what", [(math.nan, "loss"), (math.inf, "loss")])
def test_a_non_finite_loss_stops_training_naming_the_step(tmp_path, value, what):
    family = PoisonedFamily(bad={5}, value=value)
    with pytest.raises(NonFiniteError, match=rf"step 5 of 6: the {what} of phase 'main' is (nan|inf).*"
                                             r"last finite checkpoint \(step 4\) is kept"):
        train(family, make_data(), config(), checkpoint_dir=str(tmp_path), progress=False)
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert state["step"] == 4
    assert all(bool(torch.isfinite(t).all()) for t in state["family"].values())
    assert _finite(family)  # the bad step's update was not applied either


def test_on_nonfinite_skip_drops_those_updates(tmp_path):
    family = PoisonedFamily(bad={2, 5})
    result = train(family, make_data(), config(on_nonfinite="skip"), checkpoint_dir=str(tmp_path), progress=False)
    losses = result.losses["main"]
    assert torch.isnan(losses[[1, 4]]).all() and torch.isfinite(losses[[0, 2, 3, 5]]).all()
    assert _finite(family) and result.step == 6
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 6


def test_an_infinite_gradient_is_caught_by_its_norm(tmp_path):
    family = PoisonedFamily(bad={3}, value=1e25)  # finite float32 loss, gradient norm overflows
    with pytest.raises(NonFiniteError, match=r"step 3 of 6: the gradient norm of phase 'main' is inf"):
        train(family, make_data(), config(), checkpoint_dir=str(tmp_path), progress=False)
    assert _finite(family) and load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 2


class RunawayFamily(TinyFamily):
    """Loss tanh(w) of one weight: finite for every w, even +-inf; a weight decay near float32's
    largest number (AdamW: w <- (1 - lr wd) w - ...) carries w to -1.5e38 at step 1 and to +inf at step 2."""

    def __init__(self):
        super().__init__()
        self.modules = torch.nn.ModuleDict({"net": torch.nn.Linear(1, 1, bias=False)})
        torch.nn.init.constant_(self.modules["net"].weight, 0.5)

    def loss(self, phase, batch, *, labels=None, seeds):
        return torch.tanh(self.modules["net"].weight).sum()


def test_non_finite_weights_are_never_saved_or_returned(tmp_path):
    """Without clipping no gradient norm is computed: an update that overflows the weights with a
    finite loss is caught before the checkpoint (the previous one stays) and before the return."""
    cfg = config(steps=3, grad_clip=None, lr=1.0, weight_decay=3e38, decay="constant", ema=None, checkpoint_every=1)
    family = RunawayFamily()
    with pytest.raises(NonFiniteError, match=r"after step 2: parameter 'net\.weight' is not finite; the last finite "
                                             r"checkpoint \(step 1\) is kept"):
        train(family, make_data(), cfg, checkpoint_dir=str(tmp_path), progress=False)
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 1
    with pytest.raises(NonFiniteError, match=r"after step 3: parameter .* no checkpoint directory"):
        train(RunawayFamily(), make_data(), config(steps=3, grad_clip=None, lr=1.0, weight_decay=3e38,
                                                   decay="constant", ema=None, checkpoint_every=0), progress=False)


# ---------------------------------------------------------------- data with NaN/Inf rows

def test_data_with_non_finite_rows_is_refused_naming_the_first(tmp_path):
    x = torch.randn(20, 3)
    x[7, 1], x[12, 0] = math.nan, math.inf
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/Inf\) in 2 of 20 rows; the first is row 7"):
        Dataset(x)
    with pytest.raises(ValueError, match=r"row 7"):
        load_dataset(x.numpy())
    np.save(tmp_path / "bad.npy", x.numpy())
    with pytest.raises(ValueError, match=r"data set 'bad' .* row 7"):
        load_dataset(str(tmp_path / "bad.npy"))
    images = torch.zeros(5, 1, 4, 4)
    images[3, 0, 2, 2] = -math.inf
    with pytest.raises(ValueError, match=r"the first is row 3"):
        Dataset(images)


# ---------------------------------------------------------------- numeric types

def test_trainer_numbers_of_every_numeric_type():
    plain = config(steps=5, batch_size=8, lr=0.01, ema=0.9, grad_clip=1.0)
    mixed = config(steps=np.int64(5), batch_size=torch.tensor(8), lr=np.float32(0.01), ema=torch.tensor(0.9),
                   grad_clip=np.float64(1.0), seed=np.int32(3), warmup=np.uint8(0), betas=(np.float64(0.9), 0.999))
    for key, value in mixed.to_dict().items():
        assert type(value) is type(plain.to_dict()[key]), key
    assert mixed.steps == 5 and mixed.batch_size == 8 and mixed.lr == pytest.approx(0.01)
    a = train(TinyFamily(), make_data(), config(steps=np.int64(3), batch_size=np.int64(8)), progress=False)
    b = train(TinyFamily(), make_data(), config(steps=3), progress=False)
    assert torch.equal(a.losses["main"], b.losses["main"])
    assert len(load_dataset("moons", n=np.int64(64), seed=np.int64(1))) == 64


@pytest.mark.parametrize("kw, error, message", [
    (dict(steps=0), ValueError, r"TrainConfig\.steps must be >= 1, got 0"),
    (dict(steps=2.5), TypeError, r"TrainConfig\.steps must be an integer"),
    (dict(batch_size="8"), TypeError, r"TrainConfig\.batch_size must be an integer"),
    (dict(lr=0.0), ValueError, r"TrainConfig\.lr must be > 0"),
    (dict(lr=math.nan), ValueError, r"TrainConfig\.lr must be a finite number"),
    (dict(ema=1.0), ValueError, r"TrainConfig\.ema must be in \[0, 1\)"),
    (dict(betas=(0.9,)), ValueError, r"TrainConfig\.betas must be two numbers"),
    (dict(grad_clip=-1), ValueError, r"TrainConfig\.grad_clip must be > 0"),
    (dict(on_nonfinite="ignore"), ValueError, r"TrainConfig\.on_nonfinite must be one of \('raise', 'skip'\)"),
    (dict(bf16=1), TypeError, r"TrainConfig\.bf16 must be a bool"),
])
def test_trainer_errors_name_the_setting(kw, error, message):
    with pytest.raises(error, match=message):
        config(**kw)


def test_family_and_network_sizes_of_every_numeric_type():
    from genflow.train import MLP, make_family

    torch.manual_seed(0)
    plain = make_family("flow-matching", data_shape=(2,), steps=4, net_options={"hidden": 16, "layers": 2})
    torch.manual_seed(0)
    mixed = make_family("flow-matching", data_shape=(np.int64(2),), steps=np.int32(4),
                        net_options={"hidden": torch.tensor(16), "layers": np.uint8(2)})
    for (name, a), (_, b) in zip(plain.modules.state_dict().items(), mixed.modules.state_dict().items()):
        assert torch.equal(a, b), name
    assert mixed.steps == 4 and type(mixed.steps) is int
    torch.manual_seed(1)
    a = MLP(np.int64(3), hidden=np.int64(8), layers=torch.tensor(1))
    torch.manual_seed(1)
    b = MLP(3, hidden=8, layers=1)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    with pytest.raises(TypeError, match=r"hidden must be an integer, got 2.5"):
        MLP(3, hidden=2.5)
    with pytest.raises(ValueError, match=r"data_shape\[1\] must be >= 1, got 0"):
        make_family("flow-matching", data_shape=(2, 0))
