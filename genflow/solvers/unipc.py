"""UniPC: the unified predictor-corrector multistep solver (Zhao et al. 2023)."""
from genflow.solvers.base import expm1
from genflow.solvers.deis import ExponentialMultistep, solve

__all__ = ["UniPC", "unipc_coefficients"]

VARIANTS = ("bh1", "bh2")


def unipc_coefficients(h, r_past, ratio, mult, *, corrector: bool, variant: str = "bh2", data_prediction: bool = True):
    """Coefficients of one UniP-k (predictor) or UniC-k (corrector) step, ``k = len(r_past) + 1``.

    Zhao et al. (2023), Algorithms 1-3 (B(h) form); floats or per-sample tensors. With
    ``hh = -h`` (data prediction) or ``h`` (noise), ``(R, M) = (ratio, mult)`` (``sigma'/sigma, alpha'``
    or ``alpha'/alpha, sigma'``), ``r_past[j] = (lambda_{-j-1} - lambda)/h`` and
    ``B(h) = hh`` (``"bh1"``) or ``expm1(hh)`` (``"bh2"``), the step is
    ``x' = R x - M expm1(hh) m - M B(h) sum_j rho_j D_j``, ``D_j = (m_j - m)/r_j``, with ``rho`` solving
    ``sum_j rho_j r_j^(n-1) = phi_{n+1}(hh) n! / B(h)`` over the past nodes (predictor, ``rho = 1/2``
    for ``k = 2``) or the past nodes and ``r = 1`` for the new output ``m_t`` (corrector, ``rho = 1/2``
    for ``k = 1``).

    Returns:
        ``[c_x, c_m, c_{m,-1}, .., c_{m,-(k-1)}]``, then ``c_{m_t}`` with ``corrector``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    k = len(r_past) + 1
    hh = -h if data_prediction else h
    h_phi_1 = expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    r = list(r_past) + [1.0]
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for n in range(1, k + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= n + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    n = k if corrector else k - 1
    if n == 0:
        rhos = []
    elif n == 1:
        rhos = [0.5]
    else:
        rhos = solve([[rj ** e for rj in r[:n]] for e in range(n)], b[:n])
    past = [-mult * b_h * rho / rj for rho, rj in zip(rhos, r)]  # r = 1 pairs with m_t
    return [ratio, -mult * h_phi_1 - sum(past)] + past


class UniPC(ExponentialMultistep):
    """UniPC-p: the UniP-p predictor with the UniC-p corrector, B(h) form.

    Zhao et al. (2023), "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models", Algorithms 1-3, as their reference code and diffusers'
    ``UniPCMultistepScheduler`` implement them. With ``h = lambda' - lambda``, ``hh = -h`` and
    ``m = x0`` (``predict_x0=True``, default) or ``hh = h`` and ``m = eps``,
    ``r_j = (lambda_{-j} - lambda)/h``, ``D_j = (m_{-j} - m)/r_j``, the predictor is
    ``x' = R x - M expm1(hh) m - M B(h) sum_j a_j D_j``
    (``R, M = sigma'/sigma, alpha'`` for data, ``alpha'/alpha, sigma'`` for noise prediction),
    ``B(h) = hh`` (``variant="bh1"``) or ``expm1(hh)`` (``"bh2"``, default), with ``a`` solving
    ``sum_j a_j r_j^(n-1) = phi_{n+1}(hh) n! / B(h)``, ``n < p`` (``a = 1/2`` for ``p = 2``).
    The corrector redoes the step once the model has been evaluated at its end ``x'`` (the
    evaluation the next step makes anyway: 1 NFE per step), with ``D_t = m(x') - m`` as a node at
    ``r = 1`` and the full ``p x p`` system (``a = 1/2`` for ``p = 1``); the final step is not
    corrected. UniP-p has order p, UniPC-p order p + 1.

    Options (diffusers' names): ``solver_order`` 1..3 (default 2); ``variant`` (diffusers'
    ``solver_type``); ``predict_x0``; ``corrector`` (False: UniP alone); ``disable_corrector``
    (steps whose result is not corrected, as diffusers); ``warmup`` (``"singlestep"``: the first
    steps are DPM-Solver-2/3-style singlestep steps of the full order, not corrected);
    ``lower_order_final`` (default True): the order of step ``i`` is at most ``steps - i``
    whatever the number of steps, as diffusers' UniPC and the reference code do (their DEIS and
    DPM-Solver apply it below 15 steps only). The last step is then uncorrected first order, which
    makes UniPC globally second order whatever ``solver_order`` (``expected_order``).
    """

    name = "unipc"
    order = 2
    # UniPC-1/2 (orders 2/3) and UniP-3 (2, or 3 with the singlestep warmup); the corrected
    # UniPC-3 is pre-asymptotic at 10..80 steps and checked in tests/solvers/test_deis_unipc.py.
    order_test_options = tuple(dict(o, lower_order_final=False) for o in (
        {"solver_order": 1}, {"solver_order": 2}, {"solver_order": 3, "corrector": False},
        {"solver_order": 3, "corrector": False, "warmup": "singlestep"}))

    def __init__(self, model, ts, *, variant: str = "bh2", predict_x0: bool = True, corrector: bool = True,
                 disable_corrector=(), **kwargs):
        super().__init__(model, ts, **kwargs)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.data_prediction = bool(predict_x0)
        self.corrector = bool(corrector)
        self.disable_corrector = frozenset(int(i) for i in disable_corrector)
        self.pending = None  # (order, x at its start) of the previous step, awaiting correction

    @classmethod
    def expected_order(cls, solver_order=2, warmup="multistep", corrector=True, lower_order_final=True, **options):
        """The smallest of: ``p + 1`` (``p`` without corrector) for the multistep steps; 3 (2
        without corrector) for the usual warmup's first-order first step when ``p > 1``, ``p + 1``
        for the singlestep warmup; 2 for the uncorrected first-order last step that
        ``lower_order_final`` makes (``p + 1`` for the uncorrected UniP-p last step without it)."""
        p = solver_order
        steps = p + 1 if corrector else p
        warm = p + 1 if warmup == "singlestep" or p == 1 else (3 if corrector else 2)
        last = 2 if lower_order_final else p + 1
        return min(steps, warm, last)

    def final_order_cap(self, i):
        return self.steps - i if self.lower_order_final else self.solver_order

    def needs_history(self, i):
        return (self.solver_order > 1 or self.corrector) and i + 1 < self.steps

    def _coefficients(self, i, p, q, k, corrector):
        """Coefficients of ``[x, m, m_{-1}, .., m_{-(k-1)}]``, then ``m_t`` for the corrector,
        for a UniP-k / UniC-k step from grid point ``i`` (at ``p``) to ``q``."""
        h = q.lam - p.lam
        return unipc_coefficients(h, [(self.grid[i - j].lam - p.lam) / h for j in range(1, k)], *self.ratio_mult(p, q),
                                  corrector=corrector, variant=self.variant, data_prediction=self.data_prediction)

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        out = self.evaluate(x, p)
        m = self.prediction(x, out, p)  # at the predicted x, as the reference code and diffusers
        corrected = self.pending is not None
        if corrected:  # UniC-k for the step i-1 -> i
            k, x_start = self.pending
            coefs = self._coefficients(i - 1, self.grid[i - 1], p, k, corrector=True)
            x = self.update(x_start, [self.history[i - 1 - j] for j in range(k)] + [m], coefs, out=x)
        self.pending = None
        kind, k = self.plan(i)
        keep = self.needs_history(i)
        if keep:
            self.remember(i, m)
        correct_next = kind == "multistep" and self.corrector and keep and i not in self.disable_corrector
        buffer = None if correct_next else x  # the corrector reads the step's start
        if kind == "singlestep":
            x_next = self.singlestep(x, m, p, q, k, out_buffer=buffer)
        elif kind == "first" and not self.data_prediction:
            if corrected:  # x' = (alpha'/alpha) x + (sigma' - alpha' sigma/alpha) eps: finite at sigma' = 0
                x_next = self.update(x, [m], [q.alpha / p.alpha, q.sigma - q.alpha * p.sigma / p.alpha], out=buffer)
            else:  # from the raw output, which also covers alpha = 0 at the start
                x_next = self.first_order(x, out, p, q, out_buffer=buffer)
        else:  # UniP-k; for data prediction this is finite through infinite h too (expm1(-inf) = -1)
            coefs = self._coefficients(i, p, q, k, corrector=False)
            x_next = self.update(x, [m] + [self.history[i - j] for j in range(1, k)], coefs, out=buffer)
        if correct_next:
            self.pending = (k, x)
        return x_next
