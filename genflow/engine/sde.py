"""Fixed-grid SDE schemes of ``gf.solve`` and their registry ``SDE_SOLVERS = {name: class}``.

Every ``SDESolver`` subclass with a ``name`` (the schemes here and ``SDEAdaptive``) is
registered. Notation: a step from ``t`` to ``t' = t + dt`` with Brownian increment ``dW`` (from
the solve's Brownian source), ``h = |dt|`` (the increment's variance: grids may decrease),
``I_(1,0) = int_t^t' (W_s - W_t) ds``; ``f`` the drift, ``g`` the diffusion and ``g dW`` the noise
product of the SDE's noise type. References: Kloeden & Platen, "Numerical Solution of Stochastic
Differential Equations" (1992); Rößler, "Runge–Kutta methods for the strong approximation of
solutions of stochastic differential equations", SIAM J. Numer. Anal. 48 (2010).
"""
import torch

from genflow._checks import check_bool
from genflow.engine.brownian import rows, span
from genflow.engine.sde_adaptive import SDEAdaptive
from genflow.engine.sde_base import SDESolver, reciprocal
from genflow.registry import lookup, named_subclasses
from genflow.ops.fused_update import randn

__all__ = ["SDE_SOLVERS", "SDEAdaptive", "SDESolver", "get_sde_solver"]


class EulerMaruyama(SDESolver):
    """Euler–Maruyama: ``y' = y + f(t, y) dt + g(t, y) dW`` (Itô).

    Strong order 0.5 (1.0 for additive noise), weak order 1.0; 2 evaluations per step.
    Kloeden & Platen (1992), §10.2. With the Philox source and a diffusion of one
    value per sample (``g`` of shape [B] or 0-d: ``g I``) the noise is drawn inside the fused
    kernel (one pass, no noise tensor); otherwise ``g z`` is formed first (``z`` standard normal,
    ``sqrt(h)`` folded into the fused pass). torchsde:
    ``method="euler"``; diffrax: ``Euler``.
    """

    name = "euler_maruyama"

    @classmethod
    def strong_order_for(cls, noise):
        return 1.0 if noise == "additive" else 0.5

    def step(self, i, y):
        t, t_next = self.interval(i)
        dt = t_next - t
        f, g = self.f(i, 0, y), self.g(i, 0, y)
        if self.brownian.in_kernel:  # dW = scale N(seed, offset)
            seed, offset, scale = self.brownian.kernel_noise(t, t_next, y)
            if not self.isotropic(g, y):  # g * z formed first, sqrt(h) folded into the fused pass
                z = randn(self.term.brownian_shape(y), seed=seed, offset=offset, dtype=y.dtype, device=y.device)
                return self.combine(y, [f, self.prod(g, z)], [1.0, dt, scale], out=self.target(i, y))
            scale = g.to(torch.float64).reshape(-1).expand(y.shape[0]) * torch.as_tensor(scale, dtype=torch.float64,
                                                                                         device=g.device)
            return self.combine(y, [f], [1.0, dt], scale, seed=seed, offset=offset, out=self.target(i, y))
        dw = self.brownian.increment(t, t_next, y)
        return self.combine(y, [f, self.prod(g, dw)], [1.0, dt, 1.0], out=self.target(i, y))


class Milstein(SDESolver):
    """Milstein: ``y' = y + f dt + g dW + 1/2 g g' (dW^2 - h)`` (Itô; Stratonovich: ``dW^2``).

    For diagonal noise (each ``g_i`` depending on ``y_i`` alone) ``g g'`` is ``g_i dg_i/dy_i``,
    computed as torchsde does: the vector-Jacobian product ``(dg/dy)^T (g v)`` by autograd; for
    scalar noise the Jacobian-vector product ``(dg/dy) g`` (double backward); zero for additive
    noise. ``derivative_free=True`` uses ``g g' v ~ (g(y + [f dt] + g sqrt(h)) - g(y)) v / (2
    sqrt(h))`` instead (Kloeden & Platen §11.1; torchsde's ``grad_free``). Strong and
    weak order 1.0; 2 evaluations per step (plus one autograd pass, or 3 derivative-free).
    Kloeden & Platen (1992), §10.3. torchsde: ``method="milstein"``; diffrax: ``ItoMilstein``
    / ``StratonovichMilstein``.
    """

    name = "milstein"
    strong_order = 1.0
    noise_types = ("diagonal", "scalar", "additive")
    sde_types = ("ito", "stratonovich")

    def __init__(self, term, ts, *, derivative_free: bool = False, **kwargs):
        super().__init__(term, ts, **kwargs)
        self.derivative_free = check_bool("derivative_free", derivative_free) and term.noise != "additive"

    def diffusion_and_correction(self, i, y, v, root, dt, f):
        """``(g, 1/2 g g' v)`` at ``(t_i, y)``: one diffusion call (two derivative-free)."""
        if self.term.noise == "additive" or self.derivative_free:
            g = self.g(i, 0, y)
            if self.term.noise == "additive":
                return g, None
            drift = [f] if self.term.sde_type == "ito" else []
            shifted = self.combine(y, drift + [g], [1.0] + ([dt] if drift else []) + [root])
            scale = v if self.term.noise != "scalar" else rows(v, g)
            return g, (self.g(i, 0, shifted) - g).mul_(rows(0.5 * reciprocal(root), g)) * scale
        create_graph = torch.is_grad_enabled()  # the diffusion's parameters may require grad (as torchsde)
        with torch.enable_grad():
            z = y if y.requires_grad else y.detach().requires_grad_(True)
            g = self.g(i, 0, z)
            full = self.full(g, z)
            if self.term.noise == "scalar":  # (dg/dy) g by double backward: d/du of u^T (dg/dy) at g
                u = torch.zeros_like(full, requires_grad=True)
                vjp, = torch.autograd.grad(full, z, u, create_graph=True, allow_unused=True)
                gdg = None if vjp is None else torch.autograd.grad(vjp, u, full, create_graph=create_graph)[0]
                gdg = None if gdg is None else gdg * rows(0.5 * v, g)
            else:
                gdg, = torch.autograd.grad(full, z, full * (0.5 * v), create_graph=create_graph, allow_unused=True)
        g = g if create_graph else g.detach()
        return g, torch.zeros_like(y) if gdg is None else gdg

    def step(self, i, y):
        t, t_next = self.interval(i)
        dt, root = span(t, t_next)
        dw = self.brownian.increment(t, t_next, y)
        v = dw * dw if self.term.sde_type == "stratonovich" else dw * dw - rows(root * root, dw)
        f = self.f(i, 0, y)
        g, gdg = self.diffusion_and_correction(i, y, v, root, dt, f)
        terms = [f, self.prod(g, dw)] + ([] if gdg is None else [gdg])
        return self.combine(y, terms, [1.0, dt, 1.0, 1.0][:len(terms) + 1], out=self.target(i, y))


class StochasticHeun(SDESolver):
    """Stochastic Heun (Stratonovich): ``y~ = y + f dt + g dW``,
    ``y' = y + (f(t, y) + f(t', y~)) dt / 2 + (g(t, y) + g(t', y~)) dW / 2``.

    Strong order 1.0 (0.5 for general noise), weak order 1.0; 4 evaluations per step.
    Burrage, Burrage & Tian (2004), "Numerical methods for strong solutions of SDEs: an overview",
    Proc. R. Soc. A 460. torchsde: ``method="heun"``; diffrax: ``Heun``.
    """

    name = "stochastic_heun"
    strong_order = 1.0
    nfe_per_step = 4
    sde_types = ("stratonovich",)

    @classmethod
    def strong_order_for(cls, noise):
        return 0.5 if noise == "general" else 1.0

    def step(self, i, y):
        t, t_next = self.interval(i)
        dt = t_next - t
        dw = self.brownian.increment(t, t_next, y)
        f, gdw = self.f(i, 0, y), self.prod(self.g(i, 0, y), dw)
        y_euler = self.combine(y, [f, gdw], [1.0, dt, 1.0])
        f1, gdw1 = self.f(i, 1, y_euler), self.prod(self.g(i, 1, y_euler), dw)
        return self.combine(y, [f, f1, gdw, gdw1], [1.0, 0.5 * dt, 0.5 * dt, 0.5, 0.5], out=self.target(i, y))


class ReversibleHeun(SDESolver):
    """Reversible Heun (Stratonovich), with the auxiliary state ``z`` (``z_0 = y_0``)::

        z' = 2 y - z + f(t, z) dt + g(t, z) dW
        y' = y + (f(t, z) + f(t', z')) dt / 2 + (g(t, z) + g(t', z')) dW / 2

    algebraically reversible (Kidger, Foster, Li & Lyons 2021, "Efficient and Accurate Gradients
    for Neural SDEs", NeurIPS). Strong order 0.5 (1.0 for additive noise), weak
    order 1.0; 2 evaluations per step (``f``, ``g`` at ``z'``; 2 more at the first step).
    torchsde: ``method="reversible_heun"``; diffrax: ``ReversibleHeun``.
    """

    name = "reversible_heun"
    sde_types = ("stratonovich",)

    def __init__(self, term, ts, **kwargs):
        super().__init__(term, ts, **kwargs)
        self._state = None  # (f(t_i, z_i), g(t_i, z_i), z_i) carried between steps

    @classmethod
    def strong_order_for(cls, noise):
        return 1.0 if noise == "additive" else 0.5

    def step(self, i, y):
        t, t_next = self.interval(i)
        dt = t_next - t
        if i == 0 or self._state is None:
            self._state = (self.f(i, 0, y), self.g(i, 0, y), y.clone())
        f0, g0, z0 = self._state
        dw = self.brownian.increment(t, t_next, y)
        g0dw = self.prod(g0, dw)
        z1 = self.combine(z0, [y, f0, g0dw], [-1.0, 2.0, dt, 1.0], out=z0)
        f1, g1 = self.f(i, 1, z1), self.g(i, 1, z1)
        self._state = (f1, g1, z1)
        return self.combine(y, [f0, f1, g0dw, self.prod(g1, dw)], [1.0, 0.5 * dt, 0.5 * dt, 0.5, 0.5],
                            out=self.target(i, y))


def _coef(a, v):
    """``a v`` with an exact 0.0 for ``a == 0`` (the fused combination then skips the term)."""
    return 0.0 if a == 0 else a * v


class SRI(SDESolver):
    """Rößler's SRI stochastic Runge–Kutta scheme for diagonal (and scalar) noise, tableau SRI2
    (Rößler 2010; torchsde's ``srk`` for diagonal/scalar noise, its ``srid2`` table). Itô.

    Stages ``s = 1..4`` with ``f_j = f(t + c0_j dt, H0_j)``, ``g_j = g(t + c1_j dt, H1_j)``::

        H0_s = y + sum_j A0_sj f_j dt + B0_sj g_j I_(1,0)/dt
        H1_s = y + sum_j A1_sj f_j dt + B1_sj g_j sqrt(h)
        y'   = y + sum_s alpha_s f_s dt + g_s (beta1_s dW + beta2_s I_(1,1)/sqrt(h)
                                              + beta3_s I_(1,0)/dt + beta4_s I_(1,1,1)/h)

    with ``I_(1,1) = (dW^2 - h)/2`` and ``I_(1,1,1) = (dW^3 - 3 h dW)/6`` (Rößler 2010).
    Strong order 1.5 where each ``g_i`` depends on ``y_i`` alone (otherwise the mixed iterated
    integrals it omits lower the order), weak order 1.5 (as torchsde declares); 7 evaluations
    per step (``f`` of the last stage has weight 0).
    Needs ``I_(1,0)`` (``brownian=None`` or torchsde's space-time ``BrownianInterval``).
    diffrax: no diagonal-noise SRI scheme (its SRA1/ShARK take additive noise).
    """

    name = "sri"
    strong_order = 1.5
    weak_order = 1.5
    nfe_per_step = 7
    noise_types = ("diagonal", "scalar")
    needs_area = True
    C0 = (0.0, 1.0, 0.5, 0.0)
    C1 = (0.0, 0.25, 1.0, 0.25)
    A0 = ((), (1.0,), (0.25, 0.25), (0.0, 0.0, 0.0))
    A1 = ((), (0.25,), (1.0, 0.0), (0.0, 0.0, 0.25))
    B0 = ((), (0.0,), (1.0, 0.5), (0.0, 0.0, 0.0))
    B1 = ((), (-0.5,), (1.0, 0.0), (2.0, -1.0, 0.5))
    alpha = (1 / 6, 1 / 6, 2 / 3, 0.0)
    beta1 = (-1.0, 4 / 3, 2 / 3, 0.0)
    beta2 = (1.0, -4 / 3, 1 / 3, 0.0)
    beta3 = (2.0, -4 / 3, -2 / 3, 0.0)
    beta4 = (-2.0, 5 / 3, -2 / 3, 1.0)

    def step(self, i, y):
        t, t_next = self.interval(i)
        dt, root = span(t, t_next)
        dw, area = self.brownian.increment_and_area(t, t_next, y)
        h = rows(root * root, dw)
        i11 = (dw * dw - h).mul_(0.5)
        i111 = (dw * dw - 3 * h).mul_(dw).div_(6.0)
        rdt, rroot, rh = reciprocal(dt), reciprocal(root), reciprocal(root * root)
        fs, gs, g_area = [], [], []
        terms, coefs = [], [1.0]
        for s in range(4):
            h0 = self.combine(y, fs + g_area, [1.0] + [_coef(a, dt) for a in self.A0[s]] +
                              [_coef(b, rdt) for b in self.B0[s]]) if s else y
            h1 = self.combine(y, fs + gs, [1.0] + [_coef(a, dt) for a in self.A1[s]] +
                              [_coef(b, root) for b in self.B1[s]]) if s else y
            used_later = any(self.A0[k][s] or self.A1[k][s] for k in range(s + 1, 4))
            fs.append(self.f(i, self.C0[s], h0) if self.alpha[s] or used_later else None)
            gs.append(self.g(i, self.C1[s], h1))
            g_area.append(self.prod(gs[s], area) if any(self.B0[k][s] for k in range(s + 1, 4)) else None)
            weight = self.combine(dw, [i11, area, i111], [self.beta1[s], _coef(self.beta2[s], rroot),
                                                          _coef(self.beta3[s], rdt), _coef(self.beta4[s], rh)])
            terms += [fs[s], self.prod(gs[s], weight)]
            coefs += [_coef(self.alpha[s], dt), 1.0]
        return self.combine(y, terms, coefs, out=self.target(i, y))


class SRA(SDESolver):
    """Rößler's SRA stochastic Runge–Kutta scheme for additive noise, tableau SRA1 (Rößler 2010;
    torchsde's ``srk`` for additive noise, its ``sra1`` table). Itô (= Stratonovich here).

    Two stages, ``f_j = f(t + c0_j dt, H_j)``, ``g_j = g(t + c1_j dt)``, ``(c0, c1) = ((0, 3/4), (1, 0))``::

        H_1 = y,   H_2 = y + 3/4 f_1 dt + 3/2 g_1 I_(1,0)/dt
        y'  = y + (f_1/3 + 2 f_2/3) dt + g_1 (dW - I_(1,0)/dt) + g_2 I_(1,0)/dt

    Strong order 1.5, weak order 2.0 (Rößler 2010); 4 evaluations per step. Needs
    ``I_(1,0)``. diffrax: ``SRA1``.
    """

    name = "sra"
    strong_order = 1.5
    weak_order = 2.0
    nfe_per_step = 4
    noise_types = ("additive",)
    sde_types = ("ito", "stratonovich")
    needs_area = True

    def step(self, i, y):
        t, t_next = self.interval(i)
        dt = t_next - t
        dw, area = self.brownian.increment_and_area(t, t_next, y)
        rdt = reciprocal(dt)
        g1, g2 = self.g(i, 1.0, y), self.g(i, 0.0, y)
        f1 = self.f(i, 0.0, y)
        g1_area = self.prod(g1, area)
        f2 = self.f(i, 0.75, self.combine(y, [f1, g1_area], [1.0, 0.75 * dt, 1.5 * rdt]))
        return self.combine(y, [f1, f2, self.prod(g1, dw), g1_area - self.prod(g2, area)],
                            [1.0, dt / 3, 2 * dt / 3, 1.0, -rdt], out=self.target(i, y))


SDE_SOLVERS = named_subclasses(SDESolver, "SDE solver")


def get_sde_solver(name: str) -> type:
    """The SDE solver class registered as ``name``; unknown names list the closest matches."""
    return lookup(SDE_SOLVERS, name, "solver", " for a gf.SDE")
