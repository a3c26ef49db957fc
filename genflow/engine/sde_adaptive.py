"""Jolicoeur-Martineau et al.'s adaptive Euler–Maruyama / improved-Euler pair: its step control
(``AdaptivePair``, the one copy, used by ``gf.solve``'s ``SDEAdaptive`` below for a user's
``gf.SDE`` and by ``gf.sample``'s ``sde_adaptive`` on the reverse SDE of a diffusion process),
with per-sample step sizes, on the per-iteration loop of ``genflow.engine.adaptive.iterate``."""
import torch

from genflow._checks import check_bool, check_choice, check_int, check_real
from genflow.engine.adaptive import diverged_error, iterate, pooled, power, rms
from genflow.engine.sde_base import SDESolver

__all__ = ["AdaptivePair", "SDEAdaptive"]


def _rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.to(x.device).reshape((-1,) + (1,) * (x.dim() - 1))


class AdaptivePair:
    """Step control of the Euler–Maruyama / improved-Euler pair (Jolicoeur-Martineau et al. 2021,
    "Gotta Go Fast When Generating Data with Score-Based Models", Algorithm 1), as the hooks
    ``_start``, ``_attempt``, ``_control``, ``_commit`` of ``genflow.engine.adaptive.iterate``.

    The subclass's ``pair(y, t, h, out) -> (y', y'')`` takes the two stages of a step of size
    ``h`` from the per-sample times ``t`` with ONE Brownian increment (``out``: two buffers).
    Then, per sample (``error_norm="batch"``: one rms over the batch)::

        delta = max(atol, rtol max(|y'|, |y'_prev|)),  E = sqrt(mean(((y' - y'') / delta)^2))

    where ``E <= 1`` the step is accepted (``y <- y''`` with ``extrapolate``, else ``y'``;
    ``y'_prev <- y'``), and ``h <- safety h E^(-exponent)`` either way (``0.1 h`` where ``E`` is
    infinite). The first step is ``h_init``, else 1% of the interval (the paper's 0.01 on
    [0, 1]). The factor's power is ``genflow.engine.adaptive.power``: a sample's steps never
    depend on its batch. The subclass sets ``rtol``, ``atol``, ``h_init`` and calls
    ``configure_pair``.
    """

    def configure_pair(self, *, safety, exponent, extrapolate, error_norm) -> None:
        """Check and keep the pair's options (``TypeError``/``ValueError`` naming the argument)."""
        self.safety = check_real("safety", safety, low=0.0, low_open=True, high=1.0)
        self.exponent = check_real("exponent", exponent, low=0.0, low_open=True)
        self.extrapolate = check_bool("extrapolate", extrapolate)
        self.error_norm = check_choice("error_norm", error_norm, ("sample", "batch"))

    def _start(self, y, t, span):
        self._buffers = [torch.empty_like(y), torch.empty_like(y)]  # y', y''
        self._y_prev = y.clone()
        h0 = 0.01 * span if self.h_init is None else torch.full_like(t, float(self.h_init))
        return torch.minimum(h0, span)

    def _attempt(self, y, t, h):
        y1, y2 = self._trial = self.pair(y, t, h, self._buffers)
        delta = torch.maximum(y1.abs(), self._y_prev.abs()).mul_(self.rtol).clamp_min_(self.atol)
        return pooled(rms((y1 - y2).div_(delta)), self.error_norm)

    def _control(self, err, h, accept):
        return h * torch.where(torch.isinf(err), 0.1, self.safety * power(err, -self.exponent))

    def _commit(self, y, accept, done):
        y1, y2 = self._trial
        new = y2 if self.extrapolate else y1
        if bool((accept | done).all()):  # the common case: swap buffers instead of copying
            if self.extrapolate:
                self._y_prev, self._buffers = y1, [self._y_prev, y]
            else:  # y' is both the new state and y'_prev
                self._y_prev.copy_(y1)
                self._buffers[0] = y
            return new
        mask = _rows(accept, y)
        self._y_prev = torch.where(mask, y1, self._y_prev)
        if y.requires_grad:
            return torch.where(mask, new, y)
        return y.copy_(torch.where(mask, new, y))


class SDEAdaptive(AdaptivePair, SDESolver):
    """Adaptive SDE solver (Jolicoeur-Martineau et al. 2021, "Gotta Go Fast When Generating Data
    with Score-Based Models", Algorithm 1) for ``dy = f dt + g dW``, per-sample steps.

    With step ``dt`` (``|dt| = h``) and ONE Brownian increment ``dW`` for both stages::

        y'  = y + f(t, y) dt   + g(t, y) dW                         (Euler–Maruyama)
        y~  = y + f(t', y') dt + g(t', y') dW
        y'' = (y' + y~) / 2                                          (Heun)

    and the error control of ``AdaptivePair``. 4 evaluations per attempted step; strong order
    1.0 for additive noise. Defaults are the paper's (``rtol=0.05``, ``atol=0.0078``,
    ``safety=0.9``, ``exponent=0.9``, ``h_init`` 1% of the interval).

    The step sizes depend on the increments they are tried with, so they are not adapted to the
    Brownian filtration: an Itô scheme with state-dependent noise then converges to the wrong
    limit (Gaines & Lyons 1997, "Variable step size control in the numerical solution of SDEs",
    SIAM J. Appl. Math. 57; on ``dy = 0.3 y dt + 0.5 y dW`` the error grows as the tolerance
    falls). The Heun step ``y''`` is a Stratonovich scheme, which does converge under such step
    control for commutative noise, so the solver takes additive noise (Itô = Stratonovich) or
    Stratonovich SDEs with diagonal or scalar noise (``extrapolate=True`` there).

    Runs on the Brownian tree by default (``default_brownian``): a rejected step is retried on
    the same path. A user Brownian motion (one time per query) needs ``error_norm="batch"``.
    """

    name = "sde_adaptive"
    adaptive = True
    strong_order = 1.0
    weak_order = 1.0
    nfe_per_step = 4
    noise_types = ("diagonal", "scalar", "additive")
    sde_types = ("stratonovich",)
    default_brownian = "brownian_tree"  # what gf.solve's brownian=None resolves to

    def __init__(self, term, ts, *, rtol: float = 0.05, atol: float = 0.0078, safety: float = 0.9,
                 exponent: float = 0.9, extrapolate: bool = True, h_init=None, max_steps: int = 10_000,
                 error_norm: str = "sample", **kwargs):
        super().__init__(term, ts, **kwargs)
        self.rtol, self.atol = check_real("rtol", rtol, low=0.0), check_real("atol", atol, low=0.0)
        if self.rtol + self.atol == 0:
            raise ValueError("rtol and atol must not both be 0")
        self.configure_pair(safety=safety, exponent=exponent, extrapolate=extrapolate, error_norm=error_norm)
        self.h_init = None if h_init is None else check_real("h_init", h_init, low=0.0, low_open=True)
        self.max_steps = check_int("max_steps", max_steps, low=1)
        if not self.extrapolate and term.noise != "additive":
            raise ValueError("extrapolate=False keeps the Euler–Maruyama (Itô) step, which integrates a "
                             f"Stratonovich SDE only with additive noise; got noise={term.noise!r}")
        self.check_finite = True  # set by the loop
        self.accepted_steps = self.rejected_steps = None

    @classmethod
    def nfe(cls, steps: int):
        """None: known only after the solve (``evaluations``)."""
        return None

    def step(self, i, y):
        raise TypeError(f"{self.name!r} is adaptive: drive it with solve(y) (as gf.solve does), not step(i, y)")

    def solve(self, y: torch.Tensor):
        """The generator of ``genflow.engine.adaptive.iterate``: ``(y, info, progress)`` per iteration."""
        batch = y.shape[0]
        t_start = self.ts[0].expand(batch).clone()
        t_end = self.ts[-1].expand(batch).clone()
        self._direction = torch.where(t_end >= t_start, 1.0, -1.0).to(torch.float64)
        yield from iterate(self, y.clone(), t_start, t_end, max_steps=self.max_steps, check_finite=self.check_finite)

    def _times(self, t: torch.Tensor):
        """A float when every sample is at the same time, else the float64 [B] tensor."""
        return float(t[0]) if bool((t == t[0]).all()) else t

    def pair(self, y, t, h, out):
        dt = self._direction * h
        t_from, t_to = self._times(t), self._times(t + dt)
        dt = self._times(dt)
        at, at_next = (torch.as_tensor(v, dtype=y.dtype).to(y.device) for v in (t_from, t_to))
        dw = self.brownian.increment(t_from, t_to, y)
        y1 = self.combine(y, [self.drift(at, y), self.prod(self.diffusion(at, y), dw)], [1.0, dt, 1.0], out=out[0])
        f1, g1dw = self.drift(at_next, y1), self.prod(self.diffusion(at_next, y1), dw)
        return y1, self.combine(y, [y1, f1, g1dw], [0.5, 0.5, 0.5 * dt, 0.5], out=out[1])

    def _diverged(self, rows, t, h, what):
        raise diverged_error("gf.solve", self.name, rows, t, h, what, "the drift and diffusion at these times")
