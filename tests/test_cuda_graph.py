"""gf.sample(..., cuda_graph=True): what cannot be captured is refused up front; the capture /
replay plumbing (static start state and seeds, cache, eager fallback) runs on the CPU with a
recorder that replays by re-running the captured body; on a GPU (skipped without one) the real
CUDA graph equals the eager solve for the same seeds and gives fresh noise for fresh seeds."""
import pytest
import torch

import genflow as gf
from genflow import cuda_graph as graphs
from genflow.solvers import get

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(process=None):
    return gf.GaussianMixture.ring(k=8, radius=4.0, std=0.5).model(process or gf.VP())


@pytest.mark.parametrize("options, message", [
    ({}, "must run on a CUDA device"),
    ({"device": "cpu"}, "must run on a CUDA device"),
    ({"solver": "rk45"}, "is adaptive"),
    ({"schedule": torch.linspace(1.0, 1e-3, 6)[:, None].expand(6, 4)}, "per-sample time grids"),
    ({"noise_sampler": lambda a, b: torch.zeros(4, 2)}, "noise_sampler"),
    ({"noise": "brownian_tree"}, "noise='brownian_tree'"),
    ({"callback": print}, "callback"),
    ({"progress": True}, "progress bar"),
    ({"return_trajectory": True}, "return_trajectory"),
])
def test_uncapturable_solves_are_refused_up_front(options, message):
    with pytest.raises(ValueError, match=message):
        gf.sample(_model(), (4, 2), cuda_graph=True, **options)


class ReplayByRerun:
    """A stand-in for ``_record`` on the CPU: 'replay' re-runs the captured body (which reads
    only the static inputs) into the output buffer; counts captures."""

    def __init__(self):
        self.captures = 0

    def __call__(self, body, device):
        self.captures += 1
        out = body()
        return (lambda: out.copy_(body())), out


@pytest.fixture
def rerun(monkeypatch):
    recorder = ReplayByRerun()
    monkeypatch.setattr(graphs, "_record", recorder)
    graphs.clear()
    yield recorder
    graphs.clear()


def _graphed(model, solver, generator, x_T=None, **options):
    process = model.process
    ts = gf.time_grid(process, 10, "logsnr")
    return graphs.graphed_solve(model, get(solver), ts, shape=(6, 2), x_T=x_T, dtype=torch.float32, device="cpu",
                                generator=generator, eta=None, backend="auto", final_step=options.pop("final_step", None),
                                options=options)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_maruyama", "ddpm", "unipc", "dpmpp_3m_sde", "heun"])
def test_replays_equal_the_eager_solve_for_their_seeds(rerun, solver):
    model = _model()
    for generator in (3, 4, [5, 6, 7, 8, 9, 10]):
        graphed = _graphed(model, solver, generator)
        eager = gf.sample(model, (6, 2), solver=solver, steps=10, generator=generator)
        assert torch.equal(graphed, eager), (solver, generator)
    assert rerun.captures == 2  # one seed shape [1], one [B]; new seeds replay the same capture


def test_start_state_final_step_and_cache_keys(rerun):
    model = _model(gf.EDM())
    x_T = 80.0 * torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    graphed = _graphed(model, "dpmpp_2m_sde", 1, x_T=x_T, final_step="x0")
    eager = gf.sample(model, x_T=x_T, solver="dpmpp_2m_sde", steps=10, generator=1, final_step="x0")
    assert torch.equal(graphed, eager)
    x_T2 = x_T.flip(0)
    assert torch.equal(_graphed(model, "dpmpp_2m_sde", 1, x_T=x_T2, final_step="x0"),
                       gf.sample(model, x_T=x_T2, solver="dpmpp_2m_sde", steps=10, generator=1, final_step="x0"))
    assert rerun.captures == 1
    _graphed(model, "dpmpp_2m_sde", 1, x_T=x_T, final_step="x0", solver_type="heun")  # other options: new capture
    _graphed(_model(gf.EDM()), "dpmpp_2m_sde", 1, x_T=x_T, final_step="x0")           # other model: new capture
    assert rerun.captures == 3


def test_a_solve_that_fails_to_capture_runs_eagerly_with_one_warning(monkeypatch):
    def failing(body, device):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs, "_record", failing)
    graphs.clear()
    model = _model()
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        first = _graphed(model, "dpmpp_2m", 3)
    assert torch.equal(first, gf.sample(model, (6, 2), solver="dpmpp_2m", steps=10, generator=3))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _graphed(model, "dpmpp_2m", 4)  # remembered: eager, no second warning
    graphs.clear()


@needs_cuda
@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_maruyama", "ddim", "unipc", "dpmpp_2m_sde"])
def test_cuda_graph_equals_eager_on_the_gpu(solver):
    graphs.clear()
    model = _model()
    for seed in (0, 1):
        graphed = gf.sample(model, (64, 2), solver=solver, steps=12, generator=seed, device="cuda", cuda_graph=True)
        eager = gf.sample(model, (64, 2), solver=solver, steps=12, generator=seed, device="cuda")
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    a = gf.sample(model, (64, 2), solver=solver, steps=12, device="cuda", cuda_graph=True)
    b = gf.sample(model, (64, 2), solver=solver, steps=12, device="cuda", cuda_graph=True)
    assert not torch.equal(a, b)  # fresh seeds each call: fresh noise (and prior)
    graphs.clear()


@needs_cuda
def test_cuda_graph_falls_back_for_a_model_that_syncs():
    graphs.clear()
    process = gf.VP()
    model = gf.Model(lambda x, t: x * float(t[0].item()), process, prediction="eps")
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        out = gf.sample(model, (8, 2), solver="ddim", steps=5, generator=0, device="cuda", cuda_graph=True)
    torch.testing.assert_close(out, gf.sample(model, (8, 2), solver="ddim", steps=5, generator=0, device="cuda"))
    graphs.clear()
