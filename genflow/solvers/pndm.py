"""The PNDM family: Adams–Bashforth combinations of noise predictions, each moved by the DDIM step.

In the scaled variables ``y = x / alpha`` and ``s = sigma / alpha`` the probability-flow ODE is
``dy/ds = eps``. Every solver here takes the DDIM ("transfer") step of a combined noise
prediction ``e``, exact for a constant ``eps``:

    x' = (alpha'/alpha) x + alpha' (s' - s) e,        e = sum_j c_j eps_{i-j}

with the weights ``c_j`` of the last ``k`` grid points' noise predictions (1 NFE per step once
the history is filled). The solvers differ in the weights and in how the first steps, which
lack history, are taken. A step that starts at ``alpha = 0`` (``s = inf``, e.g. ``LinearPath``
at ``t = 1``) is the DDIM step ``x' = alpha' x0 + sigma' eps`` and starts the history afresh.
``lms`` (``genflow/solvers/runge_kutta.py``) is the same transfer with the exact
variable-step Adams–Bashforth weights.
"""
import itertools

import torch

from genflow.solvers.base import Solver, point

__all__ = ["IPNDM", "IPNDMV", "NoiseAdams", "PLMS", "PNDM", "adams_bashforth_weights", "variable_step_weights"]

# Adams–Bashforth weights of a uniform grid, newest noise prediction first (orders 1..4).
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def adams_bashforth_weights(order: int):
    """The ``order``-step Adams–Bashforth weights of a uniform grid, newest first."""
    if order not in _AB:
        raise ValueError(f"order must be 1, 2, 3 or 4, got {order!r}")
    return _AB[order]


def variable_step_weights(h):
    """iPNDM-v's weights from the steps ``h = [h_n, h_{n-1}, ...]`` in ``s`` (newest first, ``len(h)``
    = order; floats or [B] tensors), as Zhou et al. (2024, "Fast ODE-based Sampling for Diffusion
    Models in Around 5 Steps", their ``iPNDM_v``) and ComfyUI's ``sample_ipndm_v`` compute them.

    Order 2 is the exact variable-step Adams–Bashforth 2 (``c = (1 + r/2, -r/2)``,
    ``r = h_n/h_{n-1}``). The order-3 closed form reduces to Adams–Bashforth 3 on a uniform grid
    but is exact only for linear ``eps(s)`` on others; the order-4 one is not Adams–Bashforth 4
    even on a uniform grid (``(57, -65, 43, -11)/24``, exact for quadratic ``eps(s)`` only). These
    are the weights the samplers ship; ``lms`` has the exact Lagrange integrals."""
    if len(h) == 1:
        return [1.0]
    h0, h1 = h[0], h[1]
    base = [(2 + h0 / h1) / 2, -(h0 / h1) / 2]
    if len(h) == 2:
        return base
    h2 = h[2]
    t1 = (1 - h0 / (3 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2
    if len(h) == 3:
        return [base[0] + t1, base[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = ((1 - h0 / (3 * (h0 + h1))) / 2 + (1 - h0 / (2 * (h0 + h1))) * h0 / (6 * (h0 + h1 + h2))) \
        * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [base[0] + t1 + t2,
            base[1] - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
            -t2 * q * h1 / h2]


def _scaled_sigma(p):
    return p.sigma / p.alpha


def _any_zero(v) -> bool:
    return bool((v == 0).any()) if isinstance(v, torch.Tensor) else v == 0


class NoiseAdams(Solver):
    """Base of the solvers that move a combination of past noise predictions by the DDIM transfer
    (not registered): the history, the transfer, and the restart at ``alpha = 0``. Subclasses set
    ``max_order`` (history length + 1) and ``weights``."""

    max_order = 4

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        self.history = []  # noise predictions at the previous grid points, newest first
        self.warm = 0  # steps taken since the start (or the last restart at alpha = 0)

    def noise_prediction(self, x, p):
        """The materialised noise prediction at ``(x, p)`` (one NFE)."""
        term, a, b = self.eps_view(x, self.evaluate(x, p), p)
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and (a, b) == (0.0, 1.0):
            return term
        return self.update(x, [term], [a, b])

    def transfer(self, x, eps_terms, weights, p, q, out=None):
        """``x' = (alpha'/alpha) x + alpha' (s' - s) sum_j w_j eps_j`` (one fused update)."""
        c = q.alpha * (_scaled_sigma(q) - _scaled_sigma(p))
        return self.update(x, eps_terms, [q.alpha / p.alpha] + [c * w for w in weights], out=out)

    def weights(self, i, k):
        """The weights of a ``k``-step combination at step ``i`` (newest first)."""
        return adams_bashforth_weights(k)

    def multistep(self, i, x, eps):
        """The Adams step of the highest order the history allows (``max_order`` at most)."""
        p, q = self.grid[i], self.grid[i + 1]
        k = min(self.max_order, len(self.history) + 1)
        return self.transfer(x, [eps] + self.history[: k - 1], self.weights(i, k), p, q, out=x)

    def remember(self, eps):
        self.history = ([eps] + self.history)[: self.max_order - 1]
        self.warm += 1

    def start_at_alpha_zero(self, x, p, q):
        """DDIM from ``alpha = 0``: ``x' = alpha' x0 + sigma' eps`` (finite there); forgets the history."""
        term, [(a0, b0), (a1, b1)] = self.views(x, self.evaluate(x, p), p, "x0", "eps")
        self.history, self.warm = [], 0
        return self.update(x, [term], [q.alpha * a0 + q.sigma * a1, q.alpha * b0 + q.sigma * b1], out=x)

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        if _any_zero(p.alpha):
            return self.start_at_alpha_zero(x, p, q)
        eps = self.noise_prediction(x, p)
        x = self.multistep(i, x, eps)
        self.remember(eps)
        return x


def _check_max_order(max_order):
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= 4:
        raise ValueError(f"max_order must be an int in 1..4, got {max_order!r}")
    return max_order


class _FixedWeights(NoiseAdams):
    """Uniform-grid Adams–Bashforth weights up to ``max_order`` (1..4, default 4)."""

    @classmethod
    def expected_order(cls, *, max_order=4, **options) -> int:
        return 1 if max_order == 1 else 2

    def __init__(self, model, ts, *, max_order: int = 4, **kwargs):
        super().__init__(model, ts, **kwargs)
        self.max_order = _check_max_order(max_order)


class IPNDM(_FixedWeights):
    """iPNDM: Adams–Bashforth with the uniform-grid weights and a lower-order warm start.

    Zhang & Chen (2023), "Fast Sampling of Diffusion Models with Exponential Integrator",
    §4 and App. (improved PNDM): ``x' = (alpha'/alpha) x + alpha' (s' - s) e`` with
    ``e = eps_i`` (step 1), ``(3 eps_i - eps_{i-1})/2``, ``(23, -16, 5)/12``, then
    ``(55 eps_i - 59 eps_{i-1} + 37 eps_{i-2} - 9 eps_{i-3})/24`` (``max_order``, 1..4, default 4),
    as ComfyUI's ``sample_ipndm``. 1 NFE per step.

    Order: ``max_order`` on grids uniform in ``s = sigma/alpha``, with the Euler first step
    bounding the global order by 2. On other (smoothly varying) grids the weights ignore the step
    sizes: the local error keeps a term ``(1/2) h_i (h_i - h_{i-1}) deps/ds = O(h^3)``, so the
    global order is 2 for ``max_order >= 2`` there too (``expected_order``; 1 for ``max_order=1``).
    """

    name = "ipndm"
    order = 2
    order_test_options = ({"max_order": 1}, {"max_order": 2}, {"max_order": 3}, {"max_order": 4})


class IPNDMV(NoiseAdams):
    """iPNDM-v: iPNDM with weights recomputed from the step sizes in ``s = sigma/alpha``.

    Zhou et al. (2024), "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps" (the
    variable-step iPNDM of Zhang & Chen 2023), as ComfyUI's ``sample_ipndm_v``:
    ``x' = (alpha'/alpha) x + alpha' (s' - s) sum_j c_j eps_{i-j}`` with ``c`` from
    ``variable_step_weights`` of the last ``k = min(max_order, i + 1)`` steps (``max_order`` 1..4,
    default 4). 1 NFE per step.

    Order: the Euler first step bounds the global order by 2, and the second-order weights are the
    exact variable-step Adams–Bashforth 2, so ``max_order >= 2`` is globally second order
    (``expected_order``; ``max_order=1`` is Euler in ``s``, order 1).
    """

    name = "ipndm_v"
    order = 2
    order_test_options = ({"max_order": 1}, {"max_order": 2}, {"max_order": 3}, {"max_order": 4})

    @classmethod
    def expected_order(cls, *, max_order=4, **options) -> int:
        return 1 if max_order == 1 else 2

    def __init__(self, model, ts, *, max_order: int = 4, **kwargs):
        super().__init__(model, ts, **kwargs)
        self.max_order = _check_max_order(max_order)

    def weights(self, i, k):
        s = [_scaled_sigma(self.grid[j]) for j in range(i + 1 - k, i + 2)]  # oldest .. next
        return variable_step_weights([s[j + 1] - s[j] for j in reversed(range(k))])


class PLMS(_FixedWeights):
    """PLMS: the pseudo linear multistep method, with the pseudo improved Euler first step.

    Liu et al. (2022), "Pseudo Numerical Methods for Diffusion Models on Manifolds", eqs. 11-12
    (the transfer of the DDIM step is ``phi``): ``e = (55 eps_i - 59 eps_{i-1} + 37 eps_{i-2}
    - 9 eps_{i-3})/24``, with ``(3, -1)/2`` and ``(23, -16, 5)/12`` while the history fills.
    The first step is the pseudo improved Euler step: ``x~ = phi(x, eps_0)``, then
    ``x_1 = phi(x, (eps_0 + eps(x~, t_1))/2)`` (after a first step from ``alpha = 0``, the
    second step is this one); the history keeps ``eps_0`` and the next step
    evaluates the model at ``x_1`` afresh (diffusers' ``PNDMScheduler(skip_prk_steps=True)``).
    ``steps + 1`` NFE.

    ``max_order`` (1..4, default 4, the paper's) caps the Adams order. Global order 2 for
    ``max_order >= 2`` (1 for ``max_order=1``): on grids not uniform in ``s = sigma/alpha`` the
    uniform-grid weights leave an ``O(h^3)`` local error, as for ``ipndm``.
    """

    name = "plms"
    order = 2
    # max_order 2 and 4 are pre-asymptotic at the order test's 10..80 steps (max_order=4: local
    # slopes 3.2, 3.1, 1.6, then 1.8, 1.9 to 320 steps; 2: 1.3, 1.7, 1.9): tests/solvers/test_pndm.py
    # checks that they settle at 2 between 80 and 320 steps.
    order_test_options = ({"max_order": 1}, {"max_order": 3})

    @classmethod
    def nfe(cls, steps: int) -> int:
        return steps + 1

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        if self.warm or _any_zero(p.alpha) or _any_zero(q.sigma):
            return super().step(i, x)
        eps = self.noise_prediction(x, p)  # the first step: pseudo improved Euler
        x_euler = self.transfer(x, [eps], [1.0], p, q)
        x = self.transfer(x, [eps, self.noise_prediction(x_euler, q)], [0.5, 0.5], p, q, out=x)
        self.remember(eps)
        return x


class PNDM(_FixedWeights):
    """PNDM: three pseudo Runge–Kutta steps, then PLMS.

    Liu et al. (2022), "Pseudo Numerical Methods for Diffusion Models on Manifolds", eqs. 9-12:
    the first three steps are the pseudo fourth-order Runge–Kutta step with the DDIM transfer
    ``phi(x, e, t, t')``: ``e1 = eps(x, t)``, ``e2 = eps(phi(x, e1, t, m), m)``,
    ``e3 = eps(phi(x, e2, t, m), m)``, ``e4 = eps(phi(x, e3, t, t'), t')``,
    ``x' = phi(x, (e1 + 2 e2 + 2 e3 + e4)/6, t, t')`` with the midpoint ``m = (t + t')/2``; then
    PLMS steps with the history of ``e1``s (diffusers' ``PNDMScheduler``). 4 NFE per warm-up
    step, 1 after: ``steps + 9`` NFE (``steps >= 3``; a step from ``alpha = 0`` is a DDIM step
    before the warm-up, a warm-up step ending at ``sigma' = 0`` a PLMS step).

    ``max_order`` (1..4, default 4, the paper's) caps the Adams order. Global order 2 for
    ``max_order >= 2`` (1 for ``max_order=1``): on grids not uniform in ``s = sigma/alpha`` the
    uniform-grid weights leave an ``O(h^3)`` local error, as for ``ipndm``.

    At very few steps the warm-up diverges by construction (the paper's formulas, checked against
    a float64 transcription in tests/solvers/test_pndm.py): under ``VP`` with 1 or 2 steps, the
    third stage's transfer from ``t = 1`` (``s = sigma/alpha ~ 152``) with ``e3`` (~45, taken at an
    off-data midpoint) lands at ``|x| ~ 6e3``, where ``eps`` at ``sigma' = 0.0105`` is ~270, and
    the ring mixture's samples reach ``|x| ~ 5e3`` (``plms``: ~340 at 1 step, 60 at 2); 25 at 3
    steps, 6.3 at 6 steps (15 NFE), the data's ~6 from there on.
    """

    name = "pndm"
    order = 2
    # Not in the registry's 10..80-step order test: the three 4-NFE warm-up steps cover much of a
    # 10-step solve, so every max_order is pre-asymptotic there (default: local slopes 2.7, 2.7,
    # 2.1, then 2.05, 2.02 to 320 steps; max_order=1: 0.4 fitted). tests/solvers/test_pndm.py
    # checks that each settles at its expected_order between 80 and 320 steps.
    order_test_options = ()
    warmup_steps = 3

    @classmethod
    def nfe(cls, steps: int) -> int:
        return steps + 3 * min(steps, cls.warmup_steps)

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        # the midpoints of the steps that can be warm-up steps (the first three from alpha > 0 to
        # sigma' > 0), on the host once per solve: a step reads them (traceable by torch.compile)
        grid = self.grid
        candidates = (i for i in range(len(grid) - 1) if not (_any_zero(grid[i].alpha) or _any_zero(grid[i + 1].sigma)))
        self.midpoints = {i: point(self.process, (grid[i].t + grid[i + 1].t) / 2)
                          for i in itertools.islice(candidates, self.warmup_steps)}

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        if self.warm >= self.warmup_steps or _any_zero(p.alpha) or _any_zero(q.sigma):
            return super().step(i, x)
        m = self.midpoints[i]
        e1 = self.noise_prediction(x, p)
        e2 = self.noise_prediction(self.transfer(x, [e1], [1.0], p, m), m)
        e3 = self.noise_prediction(self.transfer(x, [e2], [1.0], p, m), m)
        e4 = self.noise_prediction(self.transfer(x, [e3], [1.0], p, q), q)
        x = self.transfer(x, [e1, e2, e3, e4], [1 / 6, 1 / 3, 1 / 3, 1 / 6], p, q, out=x)
        self.remember(e1)
        return x
