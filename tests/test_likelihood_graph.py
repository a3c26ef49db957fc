"""gf.log_likelihood(..., cuda_graph=True): the capture / replay plumbing of the drift (static
x, t and probes, the cache, the eager fallback) on the CPU with a recorder that 'replays' by
re-running the captured body; on a GPU (skipped without one) the real graph equals the eager
solve."""
import pytest
import torch

import genflow as gf
from genflow import cuda_graph, divergence, likelihood
from genflow.ops import hutchinson

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class ReplayByRerun:
    def __init__(self):
        self.captures = 0

    def __call__(self, body, device):
        self.captures += 1
        out = body()

        def replay():
            for buf, new in zip(out, body()):
                buf.copy_(new)
        return replay, out


@pytest.fixture
def rerun(monkeypatch):
    recorder = ReplayByRerun()
    monkeypatch.setattr(cuda_graph, "record", recorder)
    divergence.DRIFT_GRAPHS.clear()
    yield recorder
    divergence.DRIFT_GRAPHS.clear()


def _model():
    return gf.GaussianMixture.ring(k=4, radius=2.0, std=0.5).model(gf.VP())


@pytest.mark.parametrize("method", ["hutchinson", "exact"])
def test_graphed_drift_equals_the_eager_solve(rerun, method):
    model = _model()
    x = model.process.alpha(torch.tensor(1e-3)).item() * torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    eager, info = gf.log_likelihood(model, x, method=method, generator=3, return_info=True)
    drift = divergence.DivergenceDrift(model, method, [hutchinson.probes(x.shape, seed=3, offset=0)]
                                       if method == "hutchinson" else [], "vjp" if method == "hutchinson" else None)
    t0 = torch.full((16,), model.process.t_min, dtype=torch.float64)
    graphed = divergence.GraphedDrift(drift, x, t0)
    x_T, delta, _, nfe = likelihood.integrate_divergence(graphed, x, model.process.t_min, model.process.T,
                                                         solver="dopri5", rtol=1e-5, atol=1e-5)
    got = model.process.prior_log_prob(x_T.double()) + delta
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    assert graphed.nfe == nfe == info["nfe"] and rerun.captures == 1
    # a second solve with other probes reuses the capture and copies the new probes in
    if method == "hutchinson":
        drift2 = divergence.DivergenceDrift(model, method, [hutchinson.probes(x.shape, seed=4, offset=0)], "vjp")
        again = divergence.GraphedDrift(drift2, x, t0)
        assert rerun.captures == 1
        torch.testing.assert_close(again(x, t0)[1], drift2(x, t0)[1], rtol=0, atol=0)


def test_failed_capture_falls_back_with_a_warning(monkeypatch):
    def failing(body, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "record", failing)
    divergence.DRIFT_GRAPHS.clear()
    model = _model()
    x = torch.randn(4, 2)
    drift = divergence.DivergenceDrift(model, "exact", [], None)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        assert divergence.graphed(drift, x, torch.full((4,), 0.5, dtype=torch.float64)) is drift


def test_cuda_graph_needs_a_cuda_tensor():
    with pytest.raises(ValueError, match="cuda_graph=True needs x on a CUDA device"):
        gf.log_likelihood(_model(), torch.randn(4, 2), cuda_graph=True)


@needs_cuda
@pytest.mark.parametrize("method", ["hutchinson", "exact"])
def test_cuda_graph_likelihood_equals_eager_on_the_gpu(method):
    model = _model()
    x = torch.randn(256, 2, device="cuda")
    eager = gf.log_likelihood(model, x, method=method, generator=1)
    graphed = gf.log_likelihood(model, x, method=method, generator=1, cuda_graph=True)
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
