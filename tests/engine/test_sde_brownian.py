"""Brownian sources of gf.solve's SDE schemes (Philox increments, the Philox Brownian tree over t,
user paths), per-sample seeds and times, time direction, the adaptive SDE solver and the errors
for bad arguments."""
import math

import pytest
import torch

import genflow as gf
from genflow.engine import SDE
from genflow.engine.brownian import PhiloxBrownian, TreeBrownian, make_brownian
from genflow.engine.sde import SDE_SOLVERS

from .sde_problems import DyadicBrownian, grid, integrate

FIXED = [name for name, cls in SDE_SOLVERS.items() if not cls.adaptive]


def column(t, y):
    """``t`` (0-d, or [B] for per-sample times) broadcastable against ``y``."""
    return t.reshape((-1,) + (1,) * (y.dim() - 1))


def term_for(cls):
    """A nonlinear SDE of a noise type and interpretation the solver takes."""
    noise = "diagonal" if "diagonal" in cls.noise_types else "additive"
    diffusion = ((lambda t, y: 0.5 * torch.cos(y) + 0.1 * column(t, y)) if noise == "diagonal"
                 else (lambda t, y: (0.5 + 0.2 * column(t, y)).expand_as(y)))
    return SDE(lambda t, y: torch.sin(y) - 0.3 * column(t, y) * y, diffusion, noise=noise, sde_type=cls.sde_types[0])


# ---------------------------------------------------------------- the sources

def test_tree_refinement_keeps_coarse_increments_and_is_brownian():
    term = SDE(lambda t, y: -y, lambda t, y: torch.ones_like(y))
    like = torch.zeros(4000, 5, dtype=torch.float64)
    tree = make_brownian(7, "brownian_tree", term, like, 2.0, 5.0)
    assert isinstance(tree, TreeBrownian)
    fine = torch.linspace(2.0, 5.0, 13, dtype=torch.float64).tolist()
    pieces = [tree.increment(a, b, like) for a, b in zip(fine[:-1], fine[1:])]
    for k in range(0, 12, 4):  # a coarse step = the sum of its fine steps, whatever was queried first
        coarse = tree.increment(fine[k], fine[k + 4], like)
        assert torch.allclose(coarse, sum(pieces[k:k + 4]), rtol=0, atol=1e-12)
    assert torch.allclose(tree.increment(fine[5], fine[2], like), -tree.increment(fine[2], fine[5], like), atol=1e-12)
    h = fine[1] - fine[0]
    sample = torch.cat([p.flatten() for p in pieces]) / math.sqrt(h)
    assert abs(sample.mean().item()) < 0.01 and abs(sample.var().item() - 1) < 0.02
    assert abs(torch.corrcoef(torch.stack([pieces[0].flatten(), pieces[1].flatten()]))[0, 1].item()) < 0.02


@pytest.mark.parametrize("brownian", [None, "brownian_tree"])
def test_per_sample_seeds_are_batch_invariant(brownian):
    """Each sample's path depends on its own seed only: the batch solve equals each sample alone."""
    term = SDE(lambda t, y: -y, lambda t, y: 0.5 * torch.cos(y))
    y0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    seeds = [11, 5, 2 ** 40, 0]
    batch = integrate(term, y0, grid(8), "milstein", brownian=brownian, generator=seeds)
    for b, seed in enumerate(seeds):
        alone = integrate(term, y0[b:b + 1], grid(8), "milstein", brownian=brownian, generator=[seed])
        assert torch.equal(batch[b:b + 1], alone)


def test_philox_area_is_jointly_gaussian_with_the_increment():
    """``I_(1,0)``: mean 0, variance ``h^3/3``, covariance with ``dW`` ``h^2/2``."""
    source = PhiloxBrownian(3, lambda y: tuple(y.shape))
    like = torch.zeros(200_000, dtype=torch.float64)
    h = 0.25
    dw, area = source.increment_and_area(1.0, 1.0 + h, like)
    assert abs(dw.var().item() / h - 1) < 0.02
    assert abs(area.var().item() / (h ** 3 / 3) - 1) < 0.02
    assert abs((dw * area).mean().item() / (h ** 2 / 2) - 1) < 0.02
    dw2, _ = source.increment_and_area(1.0, 1.0 + h, like)  # a fresh draw every call
    assert abs(torch.corrcoef(torch.stack([dw, dw2]))[0, 1].item()) < 0.01


def test_euler_maruyama_draws_isotropic_noise_in_the_kernel():
    """A diffusion of one value per sample (shape [B]) takes the in-kernel noise path: equal to the
    same diffusion given per component (the noise materialised), on the same Philox stream."""
    scale = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    y0 = torch.ones(3, 4, 5, dtype=torch.float64)
    per_sample = SDE(lambda t, y: -y, lambda t, y: scale * (1 + t))
    per_component = SDE(lambda t, y: -y, lambda t, y: (scale * (1 + t))[:, None, None].expand_as(y).clone())
    a = integrate(per_sample, y0, grid(6), "euler_maruyama", generator=[1, 2, 3])
    b = integrate(per_component, y0, grid(6), "euler_maruyama", generator=[1, 2, 3])
    assert torch.allclose(a, b, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- times

@pytest.mark.parametrize("solver", FIXED)
def test_per_sample_grids_equal_each_sample_alone(solver):
    cls = SDE_SOLVERS[solver]
    term = term_for(cls)
    y0 = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]], dtype=torch.float64)
    t0, t1 = torch.tensor([0.0, 0.5, 0.2], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.6], dtype=torch.float64)
    ts = t0 + (t1 - t0) * torch.linspace(0, 1, 6, dtype=torch.float64)[:, None]
    seeds = [4, 9, 1]
    batch = integrate(term, y0, ts, solver, generator=seeds)
    for b in range(3):
        alone = integrate(term, y0[b:b + 1], ts[:, b], solver, generator=[seeds[b]])
        assert torch.allclose(batch[b:b + 1], alone, rtol=0, atol=1e-13), b


@pytest.mark.parametrize("solver", FIXED)
def test_decreasing_grid_is_the_time_reversed_forward_solve(solver):
    """Integrating from t = 1 down to 0 on W equals integrating the time-reversed SDE
    ``dy = -f(1 - s, y) ds + g(1 - s, y) dV`` forward on ``V(s) = W(1 - s) - W(1)``."""
    cls = SDE_SOLVERS[solver]
    term = term_for(cls)
    bm = DyadicBrownian((3, 2), levels=4, seed=5)

    def reversed_bm(sa, sb, return_U=False):  # V(sb) - V(sa), int (V_s - V_sa) ds
        a, b = 1 - sb, 1 - sa
        dw, u = bm(a, b, return_U=True)
        return (-dw, u - (b - a) * dw) if return_U else -dw

    flipped = SDE(lambda s, y: -term.drift(1 - s, y), lambda s, y: term.diffusion(1 - s, y), noise=term.noise,
                  sde_type=term.sde_type)
    y0 = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]], dtype=torch.float64)
    backward = integrate(term, y0, grid(8).flip(0), solver, brownian=bm)
    forward = integrate(flipped, y0, grid(8), solver, brownian=reversed_bm)
    assert torch.allclose(backward, forward, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- adaptive

def additive_term():
    return SDE(lambda t, y: torch.sin(y) - y, lambda t, y: (0.5 + 0.5 * column(t, y)).expand_as(y), noise="additive")


def test_adaptive_converges_on_the_tree_path():
    """Error against a 256-step stochastic Heun solve on the same Brownian tree path falls with
    the tolerance; samples take their own step counts; a sample's result does not depend on its batch."""
    term, seeds = additive_term(), [3, 1, 4, 1, 5, 9, 2, 6]
    y0 = torch.linspace(-2, 2, 16, dtype=torch.float64).reshape(8, 2)
    reference = integrate(term, y0, grid(256), "stochastic_heun", brownian="brownian_tree", generator=seeds)
    errors, steps = [], []
    for tol in (1e-2, 1e-3):
        infos = []
        y = gf.solve(term, y0, 0.0, 1.0, solver="sde_adaptive", rtol=tol, atol=tol, brownian="brownian_tree",
                     generator=seeds, callback=infos.append)
        errors.append((y - reference).abs().max().item())
        steps.append(infos[-1]["accepted_steps"])
    assert errors[0] > 2 * errors[1] and errors[1] < 0.04, errors
    assert len(set(steps[1].tolist())) > 1  # per-sample step sizes
    alone = gf.solve(term, y0[2:3], 0.0, 1.0, solver="sde_adaptive", rtol=1e-2, atol=1e-2, brownian="brownian_tree",
                     generator=seeds[2:3])
    batch = gf.solve(term, y0, 0.0, 1.0, solver="sde_adaptive", rtol=1e-2, atol=1e-2, brownian="brownian_tree",
                     generator=seeds)
    assert torch.equal(batch[2:3], alone)


def test_adaptive_stratonovich_multiplicative_noise_converges():
    """``dy = 0.3 y dt + 0.5 y o dW``: ``y(1) = exp(0.3 + 0.5 W(1))``; the Itô form is refused."""
    seeds = list(range(32))
    term = SDE(lambda t, y: 0.3 * y, lambda t, y: 0.5 * y, sde_type="stratonovich")
    y0 = torch.ones(32, 1, dtype=torch.float64)
    exact = torch.exp(0.3 + 0.5 * make_brownian(seeds, "brownian_tree", term, y0, 0.0, 1.0).value(1.0, y0))
    errors = [(gf.solve(term, y0, 0.0, 1.0, solver="sde_adaptive", rtol=tol, atol=tol, brownian="brownian_tree",
                        generator=seeds) - exact).abs().mean().item() for tol in (1e-2, 1e-3)]
    assert errors[1] < errors[0] / 3 and errors[1] < 5e-3, errors
    with pytest.raises(ValueError, match="integrates stratonovich SDEs, got gf.SDE\\(sde_type='ito'\\)"):
        gf.solve(SDE(term.drift, term.diffusion), y0, 0.0, 1.0, solver="sde_adaptive", generator=0)
    with pytest.raises(ValueError, match="extrapolate=False keeps the Euler–Maruyama"):
        gf.solve(term, y0, 0.0, 1.0, solver="sde_adaptive", generator=0, extrapolate=False)


# ---------------------------------------------------------------- bad arguments

Y0 = torch.zeros(4, 3, dtype=torch.float64)


def _solve(term, solver="euler_maruyama", **kwargs):
    kwargs.setdefault("steps", 2)
    return gf.solve(term, Y0, 0.0, 1.0, solver=solver, generator=0, **kwargs)


def test_wrong_noise_type_or_interpretation_for_the_solver():
    diagonal = SDE(lambda t, y: -y, lambda t, y: torch.ones_like(y))
    with pytest.raises(ValueError, match=r"solver 'sra' takes noise in \('additive',\), "
                                         r"got gf.SDE\(noise='diagonal'\)"):
        _solve(diagonal, "sra")
    with pytest.raises(ValueError, match="solver 'stochastic_heun' integrates stratonovich SDEs, got "
                                         "gf.SDE\\(sde_type='ito'\\)"):
        _solve(diagonal, "stochastic_heun")
    with pytest.raises(ValueError, match="noise in"):
        _solve(SDE(lambda t, y: -y, lambda t, y: torch.ones(4, 3, 2, dtype=torch.float64), noise="general",
                   brownian_size=2), "milstein")


def test_wrong_diffusion_or_drift_shape_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"diffusion\(t, y\) must return a tensor of shape \[4, 3\] for "
                                         r"noise='diagonal' \(y has shape \[4, 3\]\), got \[4, 2\]"):
        _solve(SDE(lambda t, y: -y, lambda t, y: torch.ones(4, 2, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"shape \[4, 3, 2\] for noise='general'.*got \[4, 3, 5\]"):
        _solve(SDE(lambda t, y: -y, lambda t, y: torch.ones(4, 3, 5, dtype=torch.float64), noise="general",
                   brownian_size=2))
    with pytest.raises(ValueError, match=r"diffusion\(t, y\) must return a tensor of shape \[4, 3\] "
                                         r"for noise='scalar'"):
        _solve(SDE(lambda t, y: -y, lambda t, y: torch.ones(4, dtype=torch.float64), noise="scalar"))
    with pytest.raises(TypeError, match="diffusion\\(t, y\\) must return y's dtype torch.float64"):
        _solve(SDE(lambda t, y: -y, lambda t, y: torch.ones(4, 3)))
    with pytest.raises(ValueError, match=r"drift\(t, y\) must return a tensor like y \(torch.float64 \[4, 3\]\)"):
        _solve(SDE(lambda t, y: y[:, :2], lambda t, y: torch.ones_like(y)), "sri")


def test_bad_brownian_arguments():
    term = SDE(lambda t, y: -y, lambda t, y: torch.ones_like(y))
    with pytest.raises(ValueError, match="needs the time integral I_\\(1,0\\)"):
        _solve(term, "sri", brownian="brownian_tree")
    with pytest.raises(ValueError, match="did you mean 'brownian_tree'"):
        _solve(term, brownian="brownain_tree")
    with pytest.raises(TypeError, match="brownian must be None, one of"):
        _solve(term, brownian=3)
    with pytest.raises(ValueError, match=r"brownian must return dW of shape \[4, 3\].*got \[4, 2\]"):
        _solve(term, brownian=lambda ta, tb: torch.zeros(4, 2))
    with pytest.raises(ValueError, match="bm\\(ta, tb, return_U=True\\)"):
        _solve(term, "sri", brownian=lambda ta, tb: torch.zeros(4, 3))
    with pytest.raises(ValueError, match="per-sample times"):
        gf.solve(term, Y0, torch.tensor([0.0, 0.1, 0.2, 0.3]), 1.0, solver="euler_maruyama", steps=2,
                 brownian=lambda ta, tb: torch.zeros(4, 3))
    with pytest.raises(TypeError, match="derivative_free must be a bool"):
        _solve(term, "milstein", derivative_free="yes")


# ---------------------------------------------------------------- dtypes, gradients

@pytest.mark.parametrize("solver", FIXED)
def test_float32_state_on_odd_shapes_is_close_to_float64(solver):
    """The same Philox stream (per-sample seeds) in float32 and float64 on a [3, 5, 7] state."""
    cls = SDE_SOLVERS[solver]
    term = term_for(cls)
    y0 = torch.linspace(-1, 1, 105, dtype=torch.float64).reshape(3, 5, 7)
    y64 = gf.solve(term, y0, 0.0, 1.0, solver=solver, steps=7, generator=[1, 2, 3])
    y32 = gf.solve(term, y0.float(), 0.0, 1.0, solver=solver, steps=7, generator=[1, 2, 3])
    assert y32.dtype == torch.float32 and y32.shape == (3, 5, 7)
    assert torch.allclose(y32.double(), y64, rtol=0, atol=1e-4)


@pytest.mark.parametrize("solver", ["euler_maruyama", "milstein", "sri", "sra", "reversible_heun"])
def test_gradients_through_the_solve_match_finite_differences(solver):
    cls = SDE_SOLVERS[solver]
    noise = "diagonal" if "diagonal" in cls.noise_types else "additive"
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def solve(th):
        diffusion = ((lambda t, y: th * torch.cos(y)) if noise == "diagonal"
                     else (lambda t, y: (th * (1 + column(t, y))).expand_as(y)))
        term = SDE(lambda t, y: -th * y + torch.sin(y), diffusion, noise=noise, sde_type=cls.sde_types[0])
        return gf.solve(term, torch.ones(2, 3, dtype=torch.float64), 0.0, 1.0, solver=solver, steps=5,
                        generator=[4, 5]).square().sum()

    solve(theta).backward()
    eps = 1e-6
    with torch.no_grad():
        numeric = (solve(theta + eps) - solve(theta - eps)) / (2 * eps)
    assert abs(theta.grad.item() - numeric.item()) <= 1e-6 * max(1.0, abs(numeric.item()))


@pytest.mark.parametrize("solver", FIXED)
def test_evaluations_match_the_declared_nfe(solver):
    """Drift plus diffusion calls per solve: ``nfe_per_step * steps`` (reversible Heun: 2 more at the start)."""
    cls = SDE_SOLVERS[solver]
    infos = []
    gf.solve(term_for(cls), torch.ones(2, 3, dtype=torch.float64), 0.0, 1.0, solver=solver, steps=6, generator=0,
             callback=infos.append)
    assert infos[-1]["nfe"] == cls.nfe(6) + (2 if solver == "reversible_heun" else 0)


@pytest.mark.parametrize("process", [gf.VP(), gf.VE()], ids=["VP", "VE"])
def test_sde_adaptive_is_one_engine_for_gf_sample_and_gf_solve(process):
    """gf.sample's sde_adaptive without churn and gf.solve's sde_adaptive on the same probability-flow
    ODE (zero diffusion) share the step control: same per-sample steps, the same samples."""
    model = gf.GaussianMixture.ring().model(process)
    x_T = process.sigma(process.T) * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    counts = {}

    def drift(t, y):
        a, b = model.coefficients("velocity", t.expand(y.shape[0]))
        return a[:, None] * y + b[:, None] * model.raw(y, t.expand(y.shape[0]))

    term = SDE(drift, lambda t, y: torch.zeros(y.shape[0], dtype=y.dtype), noise="additive")
    sampled = gf.sample(model, x_T=x_T, solver="sde_adaptive", eta=0.0, t_end=1e-3,
                        callback=lambda info: counts.update(sample=info["accepted_steps"]))
    solved = gf.solve(term, x_T, float(process.T), 1e-3, solver="sde_adaptive", generator=0,
                      callback=lambda info: counts.update(solve=info["accepted_steps"]))
    assert torch.equal(counts["sample"], counts["solve"])
    torch.testing.assert_close(sampled, solved, rtol=1e-10, atol=1e-10)


def test_gf_sample_sde_adaptive_batch_error_norm():
    """error_norm="batch" (the shared step control's option) gives every sample one step sequence."""
    model = gf.GaussianMixture.ring().model(gf.VP())
    counts = {}
    for norm in ("sample", "batch"):
        gf.sample(model, (8, 2), solver="sde_adaptive", generator=list(range(8)), dtype=torch.float64,
                  error_norm=norm, callback=lambda info, norm=norm: counts.update({norm: info["accepted_steps"]}))
    assert len(set(counts["batch"].tolist())) == 1
    assert len(set(counts["sample"].tolist())) > 1
    with pytest.raises(ValueError, match="error_norm"):
        gf.sample(model, (2, 2), solver="sde_adaptive", error_norm="global")
