"""k-diffusion's DPM-Solver samplers on a log-sigma time grid (``sample_dpm_fast``,
``sample_dpm_adaptive``) and its stochastic DPM-Solver++ (``sample_dpmpp_sde``).

``sample_dpm_fast`` runs the native ``dpm_solver_1|2|3`` steps. ``sample_dpm_adaptive`` (its
DPM-Solver-12/23 pairs share evaluations) takes its step weights from the native coefficient
function (``genflow.solvers.dpm_coefficients.dpm_weights``: ``phi_1 = expm1(h)``,
``phi_2 = phi_1/h - 1``) and its step sizes from the engine's PID controller
(``genflow.engine.adaptive.PIDController``); ``sample_dpmpp_sde`` its DPM-Solver++ weights from
``dpm_weights``. What stays here is glue: k-diffusion's argument checks, its time grid in
torch's default dtype and its order of scalar products (float32 grids round there, and the
results must equal k-diffusion's), the noise draws in its order, callbacks and the loops.
"""
import torch
from tqdm.auto import tqdm, trange

from genflow._cache import tensor_key
from genflow._checks import check_int, check_real
from genflow.compat.k_diffusion import glue
from genflow.compat.k_diffusion.glue import as_state, check_callables, check_sigmas, check_x
from genflow.compat.k_diffusion.noise import sde_noise_sampler
from genflow.engine.adaptive import PIDController
from genflow.ownership import check_input_unchanged, own_output
from genflow.ops.fused_update import MAX_TERMS, fused_update_unchecked, use_kernel
from genflow.solvers import get as get_solver
from genflow.solvers.dpm_coefficients import dpm_weights

__all__ = ["sample_dpm_adaptive", "sample_dpm_fast", "sample_dpmpp_sde"]


class _Run:
    """One sampler call: denoiser evaluations, noise draws and fused updates on the state."""

    def __init__(self, model, x, extra_args, callback):
        self.model = model
        self.extra = {} if extra_args is None else extra_args
        self.callback = callback
        self.like = x  # the template of every randn_like draw (k-diffusion's default_noise_sampler(x))
        self.kernel = use_kernel("auto", x.device)

    def denoise(self, x, sigma):
        """``model(x, sigma * s_in, **extra_args)``; ``sigma`` a float or 0-dim host tensor."""
        s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
        version = x._version
        out = as_state(self.model(x, s, **self.extra), self.like, "model")
        check_input_unchanged(x, version, f"model call at sigma={float(sigma):.4g}")
        return own_output(out, (x,))  # never the sampler's state itself

    def randn(self):
        return torch.randn_like(self.like)

    def draw(self, noise_sampler, sigma, sigma_next):
        return as_state(noise_sampler(sigma, sigma_next), self.like, "noise_sampler")

    def emit(self, info):
        if self.callback is not None:
            self.callback(info)

    def combine(self, parts, noise=None, scale=0.0):
        """``sum_k c_k v_k + scale * noise`` for ``parts = [(c_k, v_k)]`` in one fused pass.

        Coefficients (floats or 0-dim tensors) are summed per distinct tensor and exact zeros are
        dropped; more than ``MAX_TERMS + 1`` tensors (``sample_lms`` with ``order > 4``) take
        further passes.
        """
        coefs, terms = [], []
        for c, v in parts:
            c = float(c)
            for k, t in enumerate(terms):
                if t is v:
                    coefs[k] += c
                    break
            else:
                terms.append(v)
                coefs.append(c)
        kept = [(c, t) for c, t in zip(coefs, terms) if c != 0.0] or [(0.0, terms[0])]
        scale = float(scale)
        if noise is None or scale == 0.0:
            noise, scale = None, 0.0
        (c0, x), rest = kept[0], kept[1:]
        while True:
            chunk, rest = rest[:MAX_TERMS], rest[MAX_TERMS:]
            last = not rest
            x = fused_update_unchecked(x, [t for _, t in chunk], [c0] + [c for c, _ in chunk] + [scale if last else 0.0],
                                       kernel=self.kernel, noise=noise if last else None)
            if last:
                return x
            c0 = 1.0


def _default_noise_sampler(run):
    return lambda sigma, sigma_next: run.randn()


def _ancestral_step(sigma_from, sigma_to, eta):
    """``(sigma_down, sigma_up)`` of an ancestral step, as k-diffusion's ``get_ancestral_step``:
    ``sigma_up = min(sigma_to, eta sigma_to sqrt(1 - sigma_to^2/sigma_from^2))``,
    ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``; ``(sigma_to, 0)`` when ``eta = 0``. Tensors,
    elementwise (0-dim for one step, or a grid's steps at once)."""
    if not eta:
        return sigma_to, 0.
    up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def _ancestral_target(s, t, t_end, eta):
    """``(t_down, sigma_up)``: the ancestral step from ``sigma(s)`` to ``sigma(t)`` in ``t = -log
    sigma``, ``t_down`` capped at ``t_end``, and the noise that restores ``sigma(t)``
    (k-diffusion's DPM-Solver ``eta``); elementwise on tensors."""
    if not eta:
        return t, 0.
    sigma_down, _ = _ancestral_step(_sigma_of(s), _sigma_of(t), eta)
    t_down = torch.minimum(t_end, _t_of(sigma_down))
    return t_down, (_sigma_of(t) ** 2 - _sigma_of(t_down) ** 2) ** 0.5


def _sigma_of(t):
    return t.neg().exp()


def _t_of(sigma):
    return sigma.log().neg()


def _euler(x, den, sigma, sigma_next):
    """Parts of ``x + (sigma' - sigma) (x - den)/sigma`` (Euler on ``dx/dsigma = (x - D)/sigma``)."""
    c = float(sigma_next - sigma) / float(sigma)
    return [(1.0 + c, x), (-c, den)]

def _step_info(x, i, sigmas, den):
    return {'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': den}



# ---------------------------------------------------------------- DPM-Solver (Lu et al. 2022)

def _phi(h):
    """``(phi_1, phi_2) = (expm1(h), expm1(h)/h - 1)`` of a noise-prediction DPM-Solver step of
    length ``h`` (a 0-dim tensor of the grid's dtype): ``dpm_weights`` with unit weights."""
    _, w0, _, w_heun, _, _ = dpm_weights(h, 1.0, 1.0, 1.0, 1.0, data_prediction=False)
    return -w0, -w_heun


def _dpmpp_weights(t, t_next):
    """``(R, w0)`` of the first-order DPM-Solver++ step ``x' = R x + w0 D`` from ``sigma(t)`` to
    ``sigma(t_next)`` (``R = sigma'/sigma``, ``w0 = -expm1(t - t_next)``), as 0-dim tensors."""
    R, w0, *_ = dpm_weights(t_next - t, 1.0, _sigma_of(t), 1.0, _sigma_of(t_next))
    return R, w0


class _DPMSolver:
    """DPM-Solver-1/2/3 steps in ``t = -log sigma`` with noise prediction
    ``eps = (x - D(x, sigma))/sigma`` (Lu et al. 2022, eq. 3.7 and Algorithms 1, 2).

    An ``eps`` is kept as ``(state, D, sigma)`` and folded into the fused update's coefficients.
    Scalars are 0-dim host tensors in the time grid's dtype, as in k-diffusion's ``DPMSolver``.
    """

    def __init__(self, run, pbar):
        self.run, self.pbar = run, pbar

    def eps(self, cache, key, x, t):
        if key not in cache:
            sigma = _sigma_of(t)
            den = self.run.denoise(x, sigma)
            self.pbar.update()
            cache[key] = (x, den, float(sigma))
        return cache[key]

    @staticmethod
    def parts(x, cx, eps_terms):
        """Parts of ``cx x + sum_k c_k eps_k`` for ``eps_terms = [(c_k, eps_k)]``."""
        parts = [(cx, x)]
        for c, (state, den, sigma) in eps_terms:
            c = float(c) / sigma
            parts += [(c, state), (-c, den)]
        return parts

    def step_1(self, x, t, t_next, cache):
        """Parts of ``x - sigma' phi_1(h) eps``."""
        e = self.eps(cache, 'eps', x, t)
        return self.parts(x, 1.0, [(-(_sigma_of(t_next) * _phi(t_next - t)[0]), e)])

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        """Parts of ``x - sigma' phi_1(h) eps - sigma'/(2 r1) phi_1(h) (eps_1 - eps)``, ``eps_1`` at
        ``s1 = t + r1 h`` from ``u1 = x - sigma(s1) phi_1(r1 h) eps``."""
        h = t_next - t
        e = self.eps(cache, 'eps', x, t)
        s1 = t + r1 * h
        u1 = self.run.combine(self.parts(x, 1.0, [(-(_sigma_of(s1) * _phi(r1 * h)[0]), e)]))
        e1 = self.eps(cache, 'eps_r1', u1, s1)
        phi_1 = _phi(h)[0]
        a = float(_sigma_of(t_next) * phi_1)
        b = float(_sigma_of(t_next) / (2 * r1) * phi_1)
        return self.parts(x, 1.0, [(b - a, e), (-b, e1)])

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        """Parts of ``x - sigma' phi_1(h) eps - sigma'/r2 phi_2(h) (eps_2 - eps)``, ``eps_2`` at
        ``s2 = t + r2 h`` from ``u2 = x - sigma(s2) phi_1(r2 h) eps - sigma(s2) r2/r1 phi_2(r2 h)
        (eps_1 - eps)`` and ``eps_1`` at ``s1 = t + r1 h`` as in ``step_2``."""
        h = t_next - t
        e = self.eps(cache, 'eps', x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = self.run.combine(self.parts(x, 1.0, [(-(_sigma_of(s1) * _phi(r1 * h)[0]), e)]))
        e1 = self.eps(cache, 'eps_r1', u1, s1)
        phi_1, phi_2 = _phi(r2 * h)
        a = float(_sigma_of(s2) * phi_1)
        b = float(_sigma_of(s2) * (r2 / r1) * phi_2)
        u2 = self.run.combine(self.parts(x, 1.0, [(b - a, e), (-b, e1)]))
        e2 = self.eps(cache, 'eps_r2', u2, s2)
        phi_1, phi_2 = _phi(h)
        a = float(_sigma_of(t_next) * phi_1)
        b = float(_sigma_of(t_next) / r2 * phi_2)
        return self.parts(x, 1.0, [(b - a, e), (-b, e2)])


def _dpm_setup(name, model, x, sigma_min, sigma_max, extra_args, callback, eta, s_noise, noise_sampler):
    t_start, t_end, eta, s_noise = _dpm_checks(name, model, x, sigma_min, sigma_max, extra_args, callback, eta,
                                               s_noise, noise_sampler)
    run = _Run(model, x, extra_args, None)
    noise_sampler = _default_noise_sampler(run) if noise_sampler is None else noise_sampler
    return run, t_start, t_end, eta, s_noise, noise_sampler


def _dpm_checks(name, model, x, sigma_min, sigma_max, extra_args, callback, eta, s_noise, noise_sampler):
    """The checked arguments and k-diffusion's end times ``t = -log torch.tensor(sigma)``."""
    check_x(x)
    check_callables(model, extra_args, callback, noise_sampler)
    smin = check_real("sigma_min", sigma_min)
    smax = check_real("sigma_max", sigma_max)
    if smin <= 0 or smax <= 0:
        raise ValueError(f"sigma_min and sigma_max must be > 0 for {name}, got sigma_min={smin}, sigma_max={smax}")
    eta, s_noise = check_real("eta", eta, low=0.0), check_real("s_noise", s_noise)
    # k-diffusion's time grid: t = -log(torch.tensor(sigma)), in torch's default dtype for floats
    t_start = _t_of(torch.as_tensor(sigma_max).detach().cpu())
    t_end = _t_of(torch.as_tensor(sigma_min).detach().cpu())
    if not t_end > t_start and eta:
        raise ValueError(f"eta must be 0 for reverse sampling (sigma_min > sigma_max), got eta={eta}")
    return t_start, t_end, eta, s_noise


def _emit_dpm(callback, info):
    if callback is not None:
        callback({'sigma': _sigma_of(info['t']), 'sigma_hat': _sigma_of(info['t_up']), **info})


class _ByOrder:
    """Native DPM-Solver-1/2/3 steppers on one grid, step ``i`` taken by the one of order ``orders[i]``."""

    def __init__(self, solvers, orders):
        self.solvers, self.orders = solvers, orders

    @property
    def evaluations(self):
        return sum(s.evaluations for s in self.solvers.values())

    def step(self, i, x):
        return self.solvers[self.orders[i]].step(i, x)


def _fast_plan(ts, eta):
    """The plan of ``sample_dpm_fast`` on the time grid ``ts`` (``t = -log sigma``): step ``k`` from
    ``sigma(t_k)`` to ``sigma(t_down_k)``, ``t_down = min(t_end, -log sigma_down)``, then noise
    ``sqrt(sigma(t_{k+1})^2 - sigma(t_down)^2)`` (every step draws, as in k-diffusion)."""
    sig = _sigma_of(ts)
    n = sig.shape[0] - 1
    if not eta:
        grid = sig.to(torch.float64)
        return glue.Plan(grid, grid, list(range(n)), None, [0.0] * n, [0.0] * n, [True] * n)
    t_down, post = _ancestral_target(ts[:-1], ts[1:], ts[-1], eta)
    ts_native = torch.stack([sig[:-1], _sigma_of(t_down)], dim=1).reshape(-1).to(torch.float64)
    return glue.Plan(ts_native, sig.to(torch.float64), [2 * k for k in range(n)], None, [0.0] * n, post.tolist(),
                     [True] * n)


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0., s_noise=1., noise_sampler=None):
    """DPM-Solver-Fast (Lu et al. 2022, §3.4): fixed steps in ``t = -log sigma`` with orders chosen
    to spend exactly ``n`` model evaluations.

    ``m = floor(n/3) + 1`` uniform steps from ``-log sigma_max`` to ``-log sigma_min``, of orders
    ``[3]*(m-2) + [2, 1]`` when ``3 | n``, else ``[3]*(m-1) + [n mod 3]``; each the native
    ``dpm_solver_1|2|3`` step (``x' = x - sigma' expm1(h) eps + ...``), with ``eta > 0`` an
    ancestral one. Matches k-diffusion's ``sample_dpm_fast`` (its time grid is in torch's
    default dtype, float32 unless changed: set float64 for agreement to 1e-12).
    """
    t_start, t_end, eta, s_noise = _dpm_checks("sample_dpm_fast", model, x, sigma_min, sigma_max, extra_args,
                                               callback, eta, s_noise, noise_sampler)
    n = check_int("n", n, low=1)
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    plan = glue.cached_plan(("dpm_fast", tensor_key(ts), eta), lambda: _fast_plan(ts, eta))
    denoiser = glue.Denoiser(model, extra_args, callback)
    net = glue.model_of(denoiser)
    solvers = {k: get_solver(f"dpm_solver_{k}")(net, plan.ts) for k in set(orders)}
    stepper = _ByOrder(solvers, {plan.index[k]: order for k, order in enumerate(orders)})
    sig = _sigma_of(ts)

    def info(k, x):
        return {"sigma": sig[k], "sigma_hat": sig[k], "x": x.clone(), "i": k, "t": ts[k], "t_up": ts[k]}
    noise_sampler = glue.default_noise(x) if noise_sampler is None else noise_sampler
    return glue.run("sample_dpm_fast", stepper, x, plan, sig, denoiser, disable, noise_sampler=noise_sampler,
                    s_noise=s_noise, info=info)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81, eta=0., s_noise=1., noise_sampler=None, return_info=False):
    """DPM-Solver-12 / DPM-Solver-23 with adaptive steps (Lu et al. 2022, §3.4 and Appendix C).

    Each attempt from ``s`` to ``t = s + h`` computes a low (DPM-Solver-1, or -2 with
    ``r1 = 1/3``) and a high (DPM-Solver-2, or -3) order solution sharing evaluations; the error
    ``||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))||_2 / sqrt(numel)`` drives a PID
    controller (``pcoeff``, ``icoeff``, ``dcoeff``, ``accept_safety``). ``order`` NFE per attempt.
    Matches k-diffusion's ``sample_dpm_adaptive`` (including its float32 time grid); with
    ``return_info`` also returns ``{'steps', 'nfe', 'n_accept', 'n_reject'}``.
    """
    run, t_start, t_end, eta, s_noise, noise_sampler = _dpm_setup("sample_dpm_adaptive", model, x, sigma_min,
                                                                  sigma_max, extra_args, callback, eta, s_noise,
                                                                  noise_sampler)
    if order not in {2, 3}:
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    rtol_f = check_real("rtol", rtol, low=0.0)
    atol_f = check_real("atol", atol, low=0.0)
    h_init = check_real("h_init", h_init)
    if h_init == 0:
        raise ValueError("h_init must be nonzero, got 0.0")
    accept_safety = check_real("accept_safety", accept_safety)
    forward = bool(t_end > t_start)
    h_init = abs(h_init) * (1 if forward else -1)
    atol_t, rtol_t = torch.tensor(atol_f), torch.tensor(rtol_f)
    pid = PIDController(check_real("pcoeff", pcoeff), check_real("icoeff", icoeff), check_real("dcoeff", dcoeff),
                        1.5 if eta else order, accept_safety=accept_safety)
    h = h_init  # a Python float, as k-diffusion's controller keeps it (s + h stays in the grid's dtype)
    info = {'steps': 0, 'nfe': 0, 'n_accept': 0, 'n_reject': 0}
    s, x_prev = t_start, x
    with tqdm(disable=disable) as pbar:
        solver = _DPMSolver(run, pbar)
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            cache = {}
            t = torch.minimum(t_end, s + h) if forward else torch.maximum(t_end, s + h)
            t_down, sigma_up = _ancestral_target(s, t, t_end, eta)
            den = solver.eps(cache, 'eps', x, s)[1]
            if order == 2:
                x_low = run.combine(solver.step_1(x, s, t_down, cache))
                x_high = run.combine(solver.step_2(x, s, t_down, cache))
            else:
                x_low = run.combine(solver.step_2(x, s, t_down, cache, r1=1 / 3))
                x_high = run.combine(solver.step_3(x, s, t_down, cache))
            scale = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5
            accept, h_next = pid(error.reshape(1).cpu(), torch.tensor([h], dtype=torch.float64))
            h = float(h_next)
            if bool(accept):
                x_prev = x_low
                noise = run.draw(noise_sampler, _sigma_of(s), _sigma_of(t))
                x = run.combine([(1.0, x_high)], noise, float(sigma_up * s_noise))
                s = t
                info['n_accept'] += 1
            else:
                info['n_reject'] += 1
            info['nfe'] += order
            info['steps'] += 1
            _emit_dpm(callback, {'x': x, 'i': info['steps'] - 1, 't': s, 't_up': s, 'denoised': den,
                                 'error': error, 'h': h, **info})
    return (x, info) if return_info else x


# ---------------------------------------------------------------- DPM-Solver++ (Lu et al. 2022b)

@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None, r=1 / 2):
    """k-diffusion's DPM-Solver++ (stochastic): a two-stage DPM-Solver++ step with ancestral noise
    after each stage (Lu et al. 2022b; Karras et al. 2022 ancestral splitting).

    With ``t = -log sigma``, ``h = t' - t``, ``s = t + r h`` and ancestral targets ``s_``, ``t'_``
    (``sigma_down`` of ``sigma(t) -> sigma(s)`` and ``sigma(t) -> sigma(t')``):
    ``u = (sigma(s_)/sigma) x - expm1(t - s_) D + s_noise su_1 z_1``,
    ``x' = (sigma(t'_)/sigma) x - expm1(t - t'_) [(1 - 1/(2r)) D + 1/(2r) D(u, sigma(s))] + s_noise su_2 z_2``
    (the weights ``sigma(.)/sigma`` and ``-expm1(.)`` are ``dpm_weights``' first-order data-prediction ones).
    The default noise is a Brownian tree over the sigmas (``BrownianTreeNoiseSampler``); a step to
    ``sigma = 0`` is Euler. 2 NFE per step. Matches k-diffusion's ``sample_dpmpp_sde``.
    """
    check_x(x)
    check_callables(model, extra_args, callback, noise_sampler)
    host = check_sigmas(sigmas, "sample_dpmpp_sde", decreasing=True)
    eta, s_noise = check_real("eta", eta, low=0.0), check_real("s_noise", s_noise)
    r = check_real("r", r, low=0.0, low_open=True)
    noise_sampler = sde_noise_sampler(x, host) if noise_sampler is None else noise_sampler
    run = _Run(model, x, extra_args, callback)
    for i in trange(len(sigmas) - 1, disable=disable):
        den = run.denoise(x, host[i])
        run.emit(_step_info(x, i, sigmas, den))
        if host[i + 1] == 0:
            x = run.combine(_euler(x, den, host[i], host[i + 1]))
            continue
        t, t_next = _t_of(host[i]), _t_of(host[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = _ancestral_step(_sigma_of(t), _sigma_of(s), eta)
        s_ = _t_of(sd)
        noise = run.draw(noise_sampler, _sigma_of(t), _sigma_of(s))
        R, w0 = _dpmpp_weights(t, s_)
        u = run.combine([(R, x), (w0, den)], noise, s_noise * float(su))
        den2 = run.denoise(u, _sigma_of(s))
        sd, su = _ancestral_step(_sigma_of(t), _sigma_of(t_next), eta)
        t_next_ = _t_of(sd)
        R, w0 = _dpmpp_weights(t, t_next_)
        c = float(w0)
        noise = run.draw(noise_sampler, _sigma_of(t), _sigma_of(t_next))
        x = run.combine([(R, x), (c * (1 - fac), den), (c * fac, den2)], noise, s_noise * float(su))
    return x
