"""gf.solve's SDE schemes: equal to torchsde's sdeint on the same Brownian path, and their strong
(and Euler–Maruyama's weak) orders on SDEs with known solutions, registry-driven."""
import math

import pytest
import torch

from genflow.engine import SDE
from genflow.engine.sde import SDE_SOLVERS

from .sde_problems import DyadicBrownian, brownian_interval, fitted_order, gbm, grid, integrate

torchsde = pytest.importorskip("torchsde")

B, D = 5, 3
A = torch.tensor([0.5, -0.3, 0.8], dtype=torch.float64)
S = torch.tensor([0.4, 0.7, 0.2], dtype=torch.float64)


def drift(t, y):
    return torch.sin(y) * A + 0.1 * t


def diagonal(t, y):
    return S * torch.cos(y) + 0.05 * t


def additive(t, y):
    return (S * (1 + t)).expand_as(y)


def general(t, y):  # [B, D, 2]
    return torch.stack([S * torch.cos(y), 0.3 * torch.sin(y) + 0.1 * t], dim=-1)


class TorchsdeSDE(torch.nn.Module):
    """The same SDE in torchsde's conventions (additive and scalar diffusions as [B, D, m])."""

    def __init__(self, noise, sde_type, g):
        super().__init__()
        self.noise_type, self.sde_type, self.diffusion = noise, sde_type, g

    def f(self, t, y):
        return drift(t, y)

    def g(self, t, y):
        g = self.diffusion(t, y)
        if self.noise_type == "additive":
            return torch.diag_embed(g)
        return g.unsqueeze(-1) if self.noise_type == "scalar" else g


PEERS = [  # (genflow solver, torchsde method, noise, sde_type, diffusion, Brownian size)
    ("euler_maruyama", "euler", "diagonal", "ito", diagonal, (B, D)),
    ("euler_maruyama", "euler", "scalar", "ito", diagonal, (B, 1)),
    ("euler_maruyama", "euler", "general", "ito", general, (B, 2)),
    ("euler_maruyama", "euler", "additive", "ito", additive, (B, D)),
    ("milstein", "milstein", "diagonal", "ito", diagonal, (B, D)),
    ("milstein", "milstein", "diagonal", "stratonovich", diagonal, (B, D)),
    ("milstein", "milstein", "scalar", "ito", diagonal, (B, 1)),  # diagonal Jacobian: torchsde's vjp = our jvp
    ("milstein", "milstein", "additive", "ito", additive, (B, D)),
    ("sri", "srk", "diagonal", "ito", diagonal, (B, D)),
    ("sri", "srk", "scalar", "ito", diagonal, (B, 1)),
    ("sra", "srk", "additive", "ito", additive, (B, D)),
    ("stochastic_heun", "heun", "diagonal", "stratonovich", diagonal, (B, D)),
    ("stochastic_heun", "heun", "general", "stratonovich", general, (B, 2)),
    ("reversible_heun", "reversible_heun", "diagonal", "stratonovich", diagonal, (B, D)),
]


@pytest.mark.parametrize("solver, method, noise, sde_type, g, size", PEERS,
                         ids=[f"{p[0]}-{p[2]}-{p[3]}" for p in PEERS])
def test_equals_torchsde_on_the_same_path(solver, method, noise, sde_type, g, size):
    """float64, 16 steps of 1/16 (exact in binary, so both libraries query the path at the same times)."""
    torch.manual_seed(0)
    y0 = torch.randn(B, D, dtype=torch.float64)
    ts = grid(16)
    bm = brownian_interval(size, seed=3)
    expected = torchsde.sdeint(TorchsdeSDE(noise, sde_type, g), y0, ts[[0, -1]], bm=bm, method=method, dt=1 / 16)[-1]
    term = SDE(drift, g, noise=noise, sde_type=sde_type, brownian_size=2 if noise == "general" else None)
    y = integrate(term, y0, ts, solver, brownian=bm)
    assert (y - expected).abs().max().item() <= 1e-8


def test_milstein_derivative_free_equals_torchsde_grad_free():
    y0 = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bm = brownian_interval((B, D), seed=4)
    expected = torchsde.sdeint(TorchsdeSDE("diagonal", "ito", diagonal), y0, grid(16)[[0, -1]], bm=bm,
                               method="milstein", dt=1 / 16, options={"grad_free": True})[-1]
    y = integrate(SDE(drift, diagonal), y0, grid(16), "milstein", brownian=bm, derivative_free=True)
    assert (y - expected).abs().max().item() <= 1e-8


# ---------------------------------------------------------------- strong orders

STEPS = [4, 8, 16, 32, 64]
PATHS = 400


def additive_problem():
    """``dy = sin(y) dt + 2 (1 + t/2) dW``: nonlinear drift, time-dependent additive noise (the
    SRA error terms of order 1.5 do not vanish, as they do for the linear Ornstein–Uhlenbeck SDE);
    reference: SRA on 512 steps of the same path."""
    return SDE(lambda t, y: torch.sin(y), lambda t, y: (2.0 * (1 + t / 2)).expand_as(y), noise="additive")


def ornstein_uhlenbeck():
    """``dy = -1.5 y dt + 0.8 dW``; reference: SRA on 512 steps of the same path."""
    return SDE(lambda t, y: -1.5 * y, lambda t, y: torch.full_like(y, 0.8), noise="additive")


# Observed orders above the declared (worst-case) ones on these commutative-noise problems
OBSERVED = {("reversible_heun", "diagonal"): 1.0}


def _cases():
    for name, cls in SDE_SOLVERS.items():
        if cls.adaptive:
            continue
        for problem in ("gbm_ito", "gbm_stratonovich", "additive", "ornstein_uhlenbeck"):
            noise = "additive" if problem in ("additive", "ornstein_uhlenbeck") else "diagonal"
            sde_type = "stratonovich" if problem == "gbm_stratonovich" else "ito"
            if noise in cls.noise_types and (noise == "additive" or sde_type in cls.sde_types):
                if problem == "ornstein_uhlenbeck" and name == "sra":
                    continue  # linear drift: SRA is of order 2 there (see additive_problem)
                yield name, problem


@pytest.fixture(scope="module")
def problems():
    """problem -> (term, y0, Brownian path (2^9 intervals), reference solution at T = 1), built on first use."""
    built = {}

    def get(problem):
        if problem not in built:
            y0 = torch.ones(PATHS, 2, dtype=torch.float64)
            bm = DyadicBrownian((PATHS, 2), levels=9, seed=7)
            if problem.startswith("gbm"):
                term, exact = gbm(problem.split("_")[1])
                reference = exact(y0, 1.0, bm(0.0, 1.0))
            else:
                term = additive_problem() if problem == "additive" else ornstein_uhlenbeck()
                reference = integrate(term, y0, grid(512), "sra", brownian=bm)
            built[problem] = term, y0, bm, reference
        return built[problem]

    return get


@pytest.mark.parametrize("solver, problem", list(_cases()))
def test_strong_order(solver, problem, problems):
    """Mean absolute error at T = 1 over 400 paths (2-D for GBM: the linear SDE with diagonal noise
    ``dy_i = mu_i y_i dt + sigma_i y_i dW_i``), fitted over 4..64 steps: within 0.15 of the order."""
    cls = SDE_SOLVERS[solver]
    term, y0, bm, reference = problems(problem)
    errors = [(integrate(term, y0, grid(n), solver, brownian=bm) - reference).abs().mean().item() for n in STEPS]
    expected = OBSERVED.get((solver, term.noise), cls.strong_order_for(term.noise))
    order = fitted_order([1 / n for n in STEPS], errors)
    assert abs(order - expected) <= 0.15, (order, expected, errors)


def test_euler_maruyama_weak_order_one():
    """``E[y(1)^2]`` of ``dy = 0.5 y dt + 0.3 y dW`` (40,000 paths; the difference to the exact
    solution on the same path removes most Monte Carlo noise): equal to the exact discrete moment
    ``((1 + mu h)^2 + sigma^2 h)^N`` within 5 standard errors, and weak order 1 within 0.15 over
    4..32 steps."""
    mu, sigma, paths, steps = 0.5, 0.3, 40_000, [4, 8, 16, 32]
    term = SDE(lambda t, y: mu * y, lambda t, y: sigma * y)
    y0 = torch.ones(paths, 1, dtype=torch.float64)
    bm = DyadicBrownian((paths, 1), levels=5, seed=11)
    exact = torch.exp((mu - sigma ** 2 / 2) + sigma * bm(0.0, 1.0))
    errors = []
    for n in steps:
        y = integrate(term, y0, grid(n), "euler_maruyama", brownian=bm)
        difference = y.square() - exact.square()
        estimate, standard_error = difference.mean().item(), difference.std().item() / math.sqrt(paths)
        discrete = ((1 + mu / n) ** 2 + sigma ** 2 / n) ** n - math.exp(2 * mu + sigma ** 2)
        assert abs(estimate - discrete) <= 5 * standard_error, (n, estimate, discrete, standard_error)
        errors.append(abs(estimate))
    assert abs(fitted_order([1 / n for n in steps], errors) - 1.0) <= 0.15, errors


def test_milstein_scalar_noise_uses_the_jacobian_vector_product():
    """Scalar noise with ``g(y) = M y`` (M not symmetric): the Milstein term is ``1/2 M (M y) (dW^2 - h)``
    (Kloeden & Platen §10.3); torchsde's vector-Jacobian product would give ``M^T M y``."""
    m = torch.tensor([[0.2, 0.7], [-0.4, 0.1]], dtype=torch.float64)
    y0 = torch.tensor([[1.0, -2.0], [0.5, 0.3]], dtype=torch.float64)
    dw = torch.tensor([0.3, -0.8], dtype=torch.float64)
    term = SDE(lambda t, y: -y, lambda t, y: y @ m.T, noise="scalar")
    y = integrate(term, y0, grid(1, t1=0.25), "milstein", brownian=lambda ta, tb: dw)
    expected = y0 - 0.25 * y0 + (y0 @ m.T) * dw[:, None] + 0.5 * (y0 @ m.T @ m.T) * (dw ** 2 - 0.25)[:, None]
    assert torch.allclose(y, expected, rtol=0, atol=1e-14)
