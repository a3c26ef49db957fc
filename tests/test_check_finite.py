"""Divergence detection (check_finite): gf.sample stops at the first step that writes NaN/Inf and
names it (fixed-grid, adaptive and CUDA-graph solves), the particle flows likewise; plus the
public entries' handling of empty batches and misspelled names."""
import math

import pytest
import torch

import genflow as gf
from genflow import cuda_graph as graphs
from genflow._extension import HAS_EXTENSION
from genflow.solvers import get

BACKENDS = ["torch"] + (["auto"] if HAS_EXTENSION else [])


class NaNBelow:
    """eps = 0, except NaN for the first ``rows`` samples once t < t_bad."""

    def __init__(self, t_bad, rows):
        self.t_bad, self.rows = t_bad, rows

    def __call__(self, x, t):
        out = torch.zeros_like(x)
        t = t.reshape(-1)
        bad = (t < self.t_bad) & (torch.arange(x.shape[0]) < self.rows)
        out[bad] = math.nan
        return out


def _model(t_bad=0.5, rows=3, process=None):
    return gf.Model(NaNBelow(t_bad, rows), process or gf.VP(), prediction="eps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_bad_step_its_times_and_the_count_are_named(backend):
    steps = 12
    ts = gf.time_grid(gf.VP(), steps, "logsnr")
    first = int((ts < 0.5).nonzero()[0]) + 1  # euler evaluates at ts[i]: step i+1 of the grid is the first
    with pytest.raises(gf.NonFiniteError) as caught:
        gf.sample(_model(), (8, 2), solver="euler", steps=steps, generator=0, backend=backend)
    message = str(caught.value)
    assert f"solver 'euler' produced NaN/Inf at step {first} of {steps}" in message
    assert f"(t {float(ts[first - 1]):.4g} -> {float(ts[first]):.4g})" in message
    assert "3 of 8 samples diverged" in message and "check_finite=False" in message
    assert isinstance(caught.value, RuntimeError)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "ddpm", "unipc", "deis", "dpmpp_3m_sde", "rk4", "pc"])
def test_every_fixed_grid_solver_raises(solver):
    count = r"\d of 8" if solver == "pc" else "3 of 8"  # pc's Langevin step size is a batch norm: all diverge
    with pytest.raises(gf.NonFiniteError, match=rf"at step \d+ of 10 .*: {count} samples diverged"):
        gf.sample(_model(), (8, 2), solver=solver, steps=10, generator=0)


def test_check_finite_false_returns_the_nans():
    x = gf.sample(_model(), (8, 2), solver="dpmpp_2m", steps=10, generator=0, check_finite=False)
    assert torch.isnan(x[:3]).all() and torch.isfinite(x[3:]).all()
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        gf.sample(_model(), (8, 2), steps=3, check_finite=1)


def test_a_finite_solve_is_unchanged_by_the_check():
    model = gf.GaussianMixture.ring(k=4, radius=2.0, std=0.5).model(gf.VP())
    for solver in ("dpmpp_2m", "euler_maruyama", "dpm_solver_3"):
        on = gf.sample(model, (5, 2), solver=solver, steps=8, generator=1)
        off = gf.sample(model, (5, 2), solver=solver, steps=8, generator=1, check_finite=False)
        assert torch.equal(on, off), solver


def test_final_step_x0_is_checked():
    model = _model(t_bad=2e-3, rows=2)  # only the final data prediction at t_end = 1e-3 is NaN
    with pytest.raises(gf.NonFiniteError, match="final_step='x0' .* for 2 of 4 samples"):
        gf.sample(model, (4, 2), solver="euler", steps=5, t_end=1e-3, generator=0, final_step="x0")


@pytest.mark.parametrize("solver", ["rk45", "sde_adaptive"])
def test_adaptive_solvers_raise_instead_of_shrinking_the_step(solver):
    with pytest.raises(gf.NonFiniteError, match=rf"solver '{solver}' diverged .* 3 of 8 samples diverged"):
        gf.sample(_model(), (8, 2), solver=solver, generator=0)


def test_adaptive_state_check(monkeypatch):
    """An accepted step that leaves a NaN/Inf state (a finite error norm) raises too."""
    from genflow.solvers.adaptive import RK45

    attempt = RK45._attempt

    def overflowing(self, y, t, h):  # the attempted state of sample 1 overflows, its error norm is 0
        err = attempt(self, y, t, h)
        self._buffers[8][1] = math.inf
        return torch.zeros_like(err)

    monkeypatch.setattr(RK45, "_attempt", overflowing)
    model = gf.GaussianMixture.ring(k=4, radius=2.0, std=0.5).model(gf.VP())
    with pytest.raises(gf.NonFiniteError, match=r"an accepted step made the state NaN/Inf.*1 of 4 samples"):
        gf.sample(model, (4, 2), solver="rk45", generator=0)
    assert gf.sample(model, (4, 2), solver="rk45", generator=0, check_finite=False)[1].isinf().all()


class ReplayByRerun:
    """``_record`` on the CPU: 'replay' re-runs the captured body (see tests/test_cuda_graph.py)."""

    def __call__(self, body, device):
        out = body()
        return (lambda: out.copy_(body())), out


def test_cuda_graph_replay_checks_the_flag(monkeypatch):
    monkeypatch.setattr(graphs, "_record", ReplayByRerun())
    graphs.clear()
    try:
        ts = gf.time_grid(gf.VP(), 10, "logsnr")
        args = dict(shape=(8, 2), x_T=None, dtype=torch.float32, device="cpu", generator=0, eta=None,
                    backend="auto", final_step=None, options={})
        for _ in range(2):  # the capture, then a replay of it
            with pytest.raises(gf.NonFiniteError, match=r"at step \d+ of 10 .*: 3 of 8 samples diverged"):
                graphs.graphed_solve(_model(), get("dpmpp_2m"), ts, check_finite=True, **args)
        graphs.clear()
        x = graphs.graphed_solve(_model(), get("dpmpp_2m"), ts, check_finite=False, **args)
        assert torch.isnan(x[:3]).all()
    finally:
        graphs.clear()


# ---------------------------------------------------------------- particle flows


def test_particle_flows_name_the_step_and_count():
    gen = torch.Generator().manual_seed(0)
    source, target = torch.randn(16, 2, generator=gen), torch.randn(32, 2, generator=gen) + 3
    cases = [  # finite inputs (non-finite ones are rejected up front), steps that overflow float32
        ("sd_flow", lambda **kw: gf.sd_flow(source, target, sigma=1.0, steps=3, step_size=1e300, generator=0, **kw)),
        ("mmd_flow", lambda **kw: gf.mmd_flow(source, target, sigma=1.0, steps=3, step_size=1e300, **kw)),
        ("svgd", lambda **kw: gf.svgd(source, lambda y: -y, steps=3, step_size=1e300, bandwidth=1.0, **kw)),
    ]
    for name, run in cases:
        with pytest.raises(gf.NonFiniteError, match=rf"{name} diverged at step 0 \(of 3\): \d+ of 16 particles"):
            run()
        with pytest.raises(FloatingPointError):  # what these raised before
            run()
        assert not torch.isfinite(run(check_finite=False)).all(), name
        with pytest.raises(TypeError, match="check_finite must be a bool"):
            run(check_finite="yes")


def test_train_sd_generator_checks_the_generated_samples():
    class NaNNet(torch.nn.Module):
        latent_dim = 2

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, eps):
            return eps * self.scale * math.nan

    target = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(gf.NonFiniteError, match=r"train_sd_generator \(generator_net's samples\) diverged at step 0"):
        gf.train_sd_generator(NaNNet(), target, sigma=1.0, steps=2, batch_size=8, generator=0)


# ---------------------------------------------------------------- bad inputs at gf.sample


@pytest.mark.parametrize("solver", ["dpmpp_2m", "rk45"])
def test_empty_batches_and_zero_size_samples_return_empty(solver):
    model = gf.GaussianMixture.ring(k=4, radius=2.0, std=0.5).model(gf.VP())
    assert gf.sample(model, (0, 2), solver=solver, steps=4).shape == (0, 2)
    assert gf.sample(model, (3, 0), solver=solver, steps=4).shape == (3, 0)
    assert gf.sample(model, x_T=torch.zeros(0, 2, dtype=torch.float64), solver=solver, steps=4).dtype == torch.float64
    x, trajectory = gf.sample(model, (0, 2), solver="dpmpp_2m", steps=4, return_trajectory=True)
    assert x.shape == (0, 2) and trajectory.shape == (5, 0, 2)


def test_misspelled_names_and_wrong_types():
    model = gf.GaussianMixture.ring(k=4, radius=2.0, std=0.5).model(gf.VP())
    with pytest.raises(ValueError, match=r"did you mean .*'dpmpp_2m'"):
        gf.sample(model, (2, 2), solver="dpmpp_2n")
    with pytest.raises(TypeError, match="solver must be a name"):
        gf.sample(model, (2, 2), solver=3)
    with pytest.raises(ValueError, match=r"did you mean 'philox'"):
        gf.sample(model, (2, 2), solver="euler_ancestral", noise="philx")
    with pytest.raises(ValueError, match=r"did you mean 'logsnr'"):
        gf.sample(model, (2, 2), schedule="logsnrr")
    with pytest.raises(ValueError, match="shape must be non-empty with sizes >= 0"):
        gf.sample(model, (-1, 2))
    with pytest.raises(ValueError, match="x_T must have a batch dimension"):
        gf.sample(model, x_T=torch.tensor(1.0))
