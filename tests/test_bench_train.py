"""``genflow bench --only train``: the training-step rows do equal work (same loss and gradients as the
peer loops on the same draws), run at --tiny size, and torchcfm stays optional."""
import pytest
import torch

from bench.cases import train as train_cases
from genflow import bench, peers
from genflow.bench import Context

TINY = Context(tiny=True, rounds=1, round_s=0.001, compile=False)


def test_train_rows_compute_the_same_loss_and_gradients():
    fm_case, dsm_case = bench.GROUPS["train"].build(TINY)
    assert (fm_case.size, dsm_case.size) == ("(256,2)", "(256,2)")
    (dsm_peer,) = dsm_case.baselines
    assert dsm_peer.name == "plain PyTorch DSM loop"
    a = dsm_peer.check()
    assert a.ok and a.rel < 1e-5
    assert 0 < float(dsm_case.genflow()) < 10 and 0 < float(dsm_peer.fn()) < 10
    (fm_peer,) = fm_case.baselines
    if fm_peer.fn is None:
        assert fm_peer.status == "skipped: torchcfm not installed"
        return
    a = fm_peer.check()
    assert a.ok and a.rel < 1e-5
    assert 0 < float(fm_case.genflow()) < 10 and 0 < float(fm_peer.fn()) < 10


def test_train_check_detects_different_work(monkeypatch):
    """A peer DSM loop with a different noise schedule fails the agreement check."""
    _, dsm_case = bench.GROUPS["train"].build(TINY)
    monkeypatch.setattr(train_cases, "_vp_alpha_sigma", lambda process, t: (torch.exp(-t), (1 - torch.exp(-2 * t)).sqrt()))
    assert not dsm_case.baselines[0].check().ok


def test_train_without_torchcfm_is_a_skipped_row(monkeypatch):
    monkeypatch.setattr(peers, "optional", lambda name: None)
    fm_case, dsm_case = bench.GROUPS["train"].build(TINY)
    (peer,) = fm_case.baselines
    assert peer.fn is None and peer.status == "skipped: torchcfm not installed"
    assert dsm_case.baselines[0].fn is not None  # the plain loop needs nothing
    rows = bench.run_cases(TINY, ["train"], log=lambda line: None)
    assert [r.status for r in rows] == ["skipped: torchcfm not installed", "ok"]
    assert rows[1].genflow_ms > 0 and rows[1].baseline_ms > 0
