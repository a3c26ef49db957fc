"""Peer adapters for the ``solve`` group: the same user drift and diffusion written for
torchdiffeq, torchsde, torchode and diffrax (JAX's CPU backend), driven by the same Brownian
increments where there is noise, so every peer's answer can be checked against genflow's."""
import numpy as np
import torch

from bench.cases.common import MLP


class Drift:
    """``f(t, y) = MLP(y, t) - y`` on a flat state ``[B, D]`` (a contracting neural ODE drift)."""

    def __init__(self, dim: int = 2, seed: int = 0):
        self.mlp = MLP(dim, seed=seed)

    def __call__(self, t, y):
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device).reshape(-1)
        return self.mlp(y, t.expand(y.shape[0]) if t.numel() == 1 else t) - y

    def weights(self):
        """The float64 layers ``[(W, b), ...]`` as NumPy arrays (for the JAX copy)."""
        return [(w.numpy(), b.numpy()) for w, b in self.mlp.weights[torch.float64]]


class ConvDrift:
    """``f(t, y) = conv(silu(conv(y))) - y`` on images ``[B, C, H, W]`` (3x3, 16 hidden channels)."""

    def __init__(self, channels: int = 3, hidden: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(hidden, channels, 3, 3, generator=g) / (3 * channels ** 0.5)
        self.w2 = torch.randn(channels, hidden, 3, 3, generator=g) / (3 * hidden ** 0.5)

    def __call__(self, t, y):
        w1, w2 = self.w1.to(y), self.w2.to(y)
        h = torch.nn.functional.silu(torch.nn.functional.conv2d(y, w1, padding=1))
        return torch.nn.functional.conv2d(h, w2, padding=1) - y


def diffusion(t, y):
    """``g(t, y) = 0.3 (1 + 0.2 tanh y)``: diagonal, state-dependent noise."""
    return 0.3 * (1 + 0.2 * torch.tanh(y))


def diffusion_dy(y):
    """``dg/dy`` of ``diffusion`` (Milstein's correction)."""
    return 0.06 * (1 - torch.tanh(y) ** 2)


class TorchsdeSDE(torch.nn.Module):
    """The bench SDE in torchsde's interface (Itô, diagonal noise)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, drift):
        super().__init__()
        self.drift = drift

    def f(self, t, y):
        return self.drift(t, y)

    def g(self, t, y):
        return diffusion(t, y)


class Increments:
    """A Brownian motion that hands out precomputed increments ``dW[k]`` on a uniform grid:
    torchsde's ``BrownianInterval`` interface (``bm(ta, tb)``) and genflow's user Brownian."""

    def __init__(self, dws: torch.Tensor, t0: float, h: float):
        self.dws, self.t0, self.h = dws, t0, h
        self.shape, self.dtype, self.device = dws.shape[1:], dws.dtype, dws.device
        self.levy_area_approximation = "none"

    def __call__(self, ta, tb=None):
        k = int(round((float(ta) - self.t0) / self.h))
        return self.dws[k]


def diffrax_available():
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("diffrax", "equinox", "jax"))


class Diffrax:
    """The same drift (and diffusion) in JAX, solved with diffrax on the CPU backend, jitted once
    per configuration; inputs and outputs cross as NumPy arrays (the crossing is not timed)."""

    def __init__(self, drift: Drift):
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.layers = [(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)) for w, b in drift.weights()]

    def _f(self, t, y, args):
        jnp = self.jnp
        h = jnp.concatenate([y, jnp.full((y.shape[0], 1), jnp.log1p(t), y.dtype)], axis=1)
        for k, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if k < len(self.layers) - 1:
                h = self.jax.nn.silu(h)
        return h - y

    @staticmethod
    def _g(t, y, args):
        """Diagonal noise: the diffusion as a diagonal operator on the increment."""
        import jax.numpy as jnp
        import lineax

        return lineax.DiagonalLinearOperator(0.3 * (1 + 0.2 * jnp.tanh(y)))

    def ode(self, y0: np.ndarray, t0: float, t1: float, solver: str, rtol: float, atol: float):
        """A jitted ``() -> y(t1)`` with an adaptive diffrax ``solver`` (``"Tsit5"``, ``"Dopri5"``)."""
        import diffrax

        y0 = self.jnp.asarray(y0)
        term, method = diffrax.ODETerm(self._f), getattr(diffrax, solver)()
        controller = diffrax.PIDController(rtol=rtol, atol=atol)

        @self.jax.jit
        def run(y):
            sol = diffrax.diffeqsolve(term, method, t0, t1, None, y, stepsize_controller=controller,
                                      max_steps=100_000)
            return sol.ys[-1], sol.stats["num_steps"]

        return lambda: run(y0)

    def sde(self, y0: np.ndarray, dws: np.ndarray, t0: float, h: float, solver: str):
        """A jitted ``() -> y(t1)`` with diffrax's ``solver`` (``"Euler"``, ``"Heun"``) on the
        fixed grid, driven by the increments ``dws`` [N, B, D] (a path made of them)."""
        import diffrax
        import equinox as eqx

        jnp = self.jnp
        steps, start = dws.shape[0], t0

        class Path(diffrax.AbstractPath):
            increments: object
            t0 = start
            t1 = start + steps * h

            def evaluate(self, ta, tb=None, left=True):
                k = jnp.clip(jnp.round((ta - start) / h).astype(jnp.int32), 0, steps - 1)
                return self.increments[k]

        path = Path(jnp.asarray(dws))
        terms = diffrax.MultiTerm(diffrax.ODETerm(self._f), diffrax.ControlTerm(self._g, path))
        method = getattr(diffrax, solver)()
        y0 = jnp.asarray(y0)

        @eqx.filter_jit
        def run(y):
            sol = diffrax.diffeqsolve(terms, method, t0, t0 + steps * h, h, y, max_steps=steps + 1)
            return sol.ys[-1]

        return lambda: run(y0)

    def block(self, fn):
        """``fn`` that waits for JAX's asynchronous dispatch (timed as the caller sees it)."""
        def call():
            out = fn()
            return self.jax.block_until_ready(out)
        return call
