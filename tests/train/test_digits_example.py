"""examples/digits.py: the dequantised digits data, and a --quick run producing figures and a finite bpd."""
import importlib.util
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def digits():
    spec = importlib.util.spec_from_file_location("digits_example", os.path.join(ROOT, "examples", "digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_levels_and_dequantised_batches(digits):
    levels = digits.digit_levels()
    assert levels.shape == (1797, 1, 8, 8) and levels.dtype == torch.int64
    assert int(levels.min()) == 0 and int(levels.max()) == 16
    train, test = digits.split(levels, 256)
    assert train.shape[0] == 1797 - 256 and test.shape[0] == 256
    data = digits.dequantised(train.reshape(-1, 64))
    y1, labels = data.batch(4096, generator=torch.Generator().manual_seed(0))
    y2, _ = data.batch(4096, generator=torch.Generator().manual_seed(1))
    assert labels is None and y1.shape == (4096, 64)
    assert not torch.equal(y1, y2)  # fresh rows and fresh noise each batch
    cell = (y1 + 1) / 2 * 17  # = x + u with x in {0..16}, u in [0, 1)
    frac = cell - cell.floor()
    assert (cell >= 0).all() and (cell < 17).all()
    assert 0.45 < float(frac.mean()) < 0.55 and float(frac.std()) > 0.25  # u ~ U[0, 1), not a constant shift


def test_quick_run_writes_figures_and_a_finite_bpd(digits, tmp_path, capsys):
    rows = digits.main(["--quick", "--quiet", "--out", str(tmp_path)])
    assert [r["family"] for r in rows] == ["diffusion", "flow-matching"]
    for r, name in zip(rows, ("digits_diffusion.png", "digits_flow.png")):
        assert r["figure"] == os.path.join(str(tmp_path), name)
        assert os.path.getsize(r["figure"]) > 1000
        assert math.isfinite(r["bpd"]) and 0 < r["bpd"] < 20
    out = capsys.readouterr().out
    assert "| diffusion | mlp | 3 |" in out and "digits_flow.png" in out
