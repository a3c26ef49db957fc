"""DEIS and UniPC: equality with diffusers, the declared orders, and the edge cases.

* diffusers (float32, the standard ``set_timesteps`` / ``scale_model_input`` / ``step`` loop) on
  an exact mixture eps-network under ``gf.DiscreteVP(scheduler.alphas_cumprod)``; the network
  takes diffusers' timesteps and genflow reads it with ``time=process.timestep``, and genflow
  gets the scheduler's grid explicitly, ``t = (timestep + 1)/N``, ending where diffusers' last
  sigma is (``alphas_cumprod[0]``, ``t = 1/N``), to 1e-4 relative: ``DEISMultistepScheduler``
  (orders 1-3) and ``UniPCMultistepScheduler`` (bh1 and bh2, orders 1-3,
  ``final_sigmas_type="sigma_min"``), with ``lower_order_final`` active and not, thresholding,
  noise prediction and ``disable_corrector``.
* Pinned differences: diffusers' default UniPC last step goes to sigma = 0 (a jump to the data
  prediction, which throws the last correction away) where the paper's reference code ends at
  t = 1/N as genflow does; diffusers' UniPC lowers the final orders at any step count (its DEIS
  only below 15 steps), and genflow's ``unipc`` follows it; diffusers' third-order DEIS loses
  float32 accuracy to cancellation in its coefficients beyond a few dozen steps.
* The declared orders (``expected_order``), measured where they are asymptotic: from
  mid-noise, 30-240 steps. ``tests/solvers/test_order.py`` runs the ``order_test_options``
  from pure noise with 10-80 steps, where the warmup and final-step effects are invisible.
"""
import pytest
import torch

import genflow as gf
from genflow.solvers import SOLVERS

from ..peers import diffusers
from .references import fit_order, mixture, pf_ode_solution

F32_RTOL = 1e-4


def _assert_rel(actual, expected, rtol):
    """``|a - e| <= rtol (|e| + max|e|)``: relative, with the scale of the batch."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=rtol * scale)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _setup(scheduler_name, steps, **config):
    """A diffusers scheduler, its DiscreteVP, a network ``net(x, timestep) -> eps`` of the exact
    mixture, the matching genflow model and genflow's grid ``(timesteps + 1)/N`` plus ``1/N``."""
    sched = getattr(diffusers(), scheduler_name)(**config)
    sched.set_timesteps(steps)
    process = gf.DiscreteVP(sched.alphas_cumprod)
    exact = mixture().model(process)

    def net(x, timestep):
        timestep = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return exact.eps(x.double(), process.t_from_timestep(timestep)).to(x.dtype)

    model = gf.Model(net, process, prediction="eps", time=process.timestep)
    grid = process.t_from_timestep(sched.timesteps.to(torch.float64))
    grid = torch.cat([grid, torch.tensor([1.0 / process.num_train_timesteps], dtype=torch.float64)])
    return sched, net, model, grid


def _x_T(shape=(16, 2), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def _diffusers_loop(sched, net, x_T):
    """diffusers' standard sampling loop (``set_timesteps`` already called)."""
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(net(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x


# ------------------------------------------------------------------ equality with diffusers

STEPS = (5, 10, 25)  # lower_order_final acts below 15 steps


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_equals_diffusers(order, steps):
    sched, net, model, grid = _setup("DEISMultistepScheduler", steps, solver_order=order)
    x_T = _x_T()
    ours = gf.sample(model, x_T=x_T, solver="deis", schedule=grid, solver_order=order)
    _assert_rel(ours, _diffusers_loop(sched, net, x_T), F32_RTOL)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_equals_diffusers(variant, order, steps):
    sched, net, model, grid = _setup("UniPCMultistepScheduler", steps, solver_order=order, solver_type=variant,
                                     final_sigmas_type="sigma_min")
    x_T = _x_T()
    ours = gf.sample(model, x_T=x_T, solver="unipc", schedule=grid, solver_order=order, variant=variant)
    _assert_rel(ours, _diffusers_loop(sched, net, x_T), F32_RTOL)


OPTION_CASES = [  # (scheduler, diffusers config, genflow solver, genflow options, x shape)
    ("DEISMultistepScheduler", {"lower_order_final": False}, "deis", {"lower_order_final": False}, (16, 2)),
    ("DEISMultistepScheduler", {"thresholding": True, "sample_max_value": 1.5}, "deis",
     {"thresholding": True, "sample_max_value": 1.5}, (16, 1, 2)),  # diffusers thresholds [B, C, ...]
    ("UniPCMultistepScheduler", {"predict_x0": False}, "unipc", {"predict_x0": False}, (16, 2)),
    ("UniPCMultistepScheduler", {"disable_corrector": [0, 1, 4]}, "unipc", {"disable_corrector": (0, 1, 4)}, (16, 2)),
    ("UniPCMultistepScheduler", {"thresholding": True, "sample_max_value": 1.5}, "unipc",
     {"thresholding": True, "sample_max_value": 1.5}, (16, 1, 2)),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "predict_x0": False}, "unipc",
     {"variant": "bh1", "predict_x0": False}, (16, 2)),
]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("scheduler, config, solver, options, shape", OPTION_CASES,
                         ids=[f"{s}-{c}" for s, c, *_ in OPTION_CASES])
def test_options_equal_diffusers(scheduler, config, solver, options, shape, order):
    if scheduler.startswith("UniPC"):
        config = {**config, "final_sigmas_type": "sigma_min"}
    sched, net, model, grid = _setup(scheduler, 10, solver_order=order, **config)
    x_T = _x_T(shape)
    ours = gf.sample(model, x_T=x_T, solver=solver, schedule=grid, solver_order=order, **options)
    theirs = _diffusers_loop(sched, net, x_T)
    _assert_rel(ours, theirs, F32_RTOL)
    if "thresholding" in options or "disable_corrector" in options:  # the option matters here
        plain = {k: v for k, v in options.items() if k not in ("thresholding", "disable_corrector")}
        assert _rel(gf.sample(model, x_T=x_T, solver=solver, schedule=grid, solver_order=order, **plain), theirs) > 5 * F32_RTOL


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_lowers_the_final_orders_at_any_step_count(order):
    """diffusers' UniPC (and the reference code) caps step i at order ``steps - i`` with 25 steps
    too, unlike its DEIS (below 15 only); genflow's ``unipc`` follows it."""
    sched, net, model, grid = _setup("UniPCMultistepScheduler", 25, solver_order=order, final_sigmas_type="sigma_min")
    x_T = _x_T()
    theirs = _diffusers_loop(sched, net, x_T)
    _assert_rel(gf.sample(model, x_T=x_T, solver="unipc", schedule=grid, solver_order=order), theirs, F32_RTOL)
    without = gf.sample(model, x_T=x_T, solver="unipc", schedule=grid, solver_order=order, lower_order_final=False)
    assert _rel(without, theirs) > 1e-2


@pytest.mark.parametrize("steps", [8, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_diffusers_unipc_default_final_step_is_a_jump_to_the_data_prediction(order, steps):
    """diffusers' default ``final_sigmas_type="zero"`` replaces the last step (to t = 1/N, where the
    paper's code and genflow end) by one to sigma = 0: the data prediction at the predicted
    state, which multiplies the corrected state by sigma = 0. For orders 1-2 that equals genflow
    on the grid without its last point, uncapped, plus ``final_step="x0"``; for order 3 diffusers'
    second-to-last step is second order, which no genflow option reproduces."""
    sched, net, model, grid = _setup("UniPCMultistepScheduler", steps, solver_order=order)
    x_T = _x_T()
    theirs = _diffusers_loop(sched, net, x_T)
    paper = gf.sample(model, x_T=x_T, solver="unipc", schedule=grid, solver_order=order)
    assert _rel(paper, theirs) > 5 * F32_RTOL
    jump = gf.sample(model, x_T=x_T, solver="unipc", schedule=grid[:-1], solver_order=order,
                     lower_order_final=False, final_step="x0")
    if order < 3:
        _assert_rel(jump, theirs, F32_RTOL)
    else:
        assert _rel(jump, theirs) > 5 * F32_RTOL


def test_diffusers_deis_order_3_loses_float32_accuracy_over_many_steps():
    """diffusers computes DEIS-3's coefficients as differences of large terms in float32 (its
    sigmas' dtype): at 100 steps its float32 loop is off by more than 1e-4, while with float64
    sigmas it agrees with genflow (float64 coefficients) to 1e-7."""
    sched, net, model, grid = _setup("DEISMultistepScheduler", 100, solver_order=3)
    x_T = _x_T()
    assert _rel(gf.sample(model, x_T=x_T, solver="deis", schedule=grid, solver_order=3), _diffusers_loop(sched, net, x_T)) > 1e-4
    sched.set_timesteps(100)
    sched.sigmas = sched.sigmas.double()
    x64 = x_T.double()
    ours = gf.sample(model, x_T=x64, solver="deis", schedule=grid, solver_order=3)
    _assert_rel(ours, _diffusers_loop(sched, net, x64), 1e-7)


# ------------------------------------------------------------------ declared orders

MID = {"a": (0.5, 0.05), "b": (0.4, 0.02)}  # (t_start, t_end) of gf.VP(); "b": where UniPC-3 nears 4 sooner
ORDER_CASES = [("deis", o, "a") for o in SOLVERS["deis"].order_test_options] + \
    [("unipc", o, "a") for o in SOLVERS["unipc"].order_test_options] + [
        ("unipc", {"solver_order": 2, "lower_order_final": False}, "a"),
        ("unipc", {"solver_order": 3, "lower_order_final": False}, "a"),
        ("unipc", {"solver_order": 3, "warmup": "singlestep", "lower_order_final": False}, "b"),
        ("unipc", {"solver_order": 1, "corrector": False}, "a"),
        ("unipc", {"solver_order": 3, "corrector": False, "lower_order_final": False}, "a"),
        ("unipc", {"solver_order": 3, "corrector": False, "warmup": "singlestep", "lower_order_final": False}, "a"),
        ("unipc", {"solver_order": 2, "predict_x0": False, "variant": "bh1", "lower_order_final": False}, "a"),
    ]


def _mid_noise_problem(regime):
    t_start, t_end = MID[regime]
    process, mix = gf.VP(), mixture()
    g = torch.Generator().manual_seed(3)
    x_start = process.alpha(t_start) * mix.sample(8, generator=g, dtype=torch.float64) + \
        process.sigma(t_start) * torch.randn(8, 2, generator=g, dtype=torch.float64)
    model = mix.model(process)
    return model, x_start, t_start, t_end, pf_ode_solution(model, x_start, t_start, t_end)


@pytest.mark.parametrize("solver, options, regime", ORDER_CASES, ids=[f"{s}{o}" for s, o, _ in ORDER_CASES])
def test_declared_order_holds_from_mid_noise(solver, options, regime):
    """Starting at mid noise the first steps matter, so the usual warmup's first-order first step
    shows (DEIS-3: 2, with ``warmup="singlestep"``: 3), and so does UniPC's uncorrected
    first-order last step under ``lower_order_final`` (2 for every order; without it UniPC-p has
    order p + 1, or 3 for p = 3 with the usual warmup)."""
    model, x_start, t_start, t_end, reference = _mid_noise_problem(regime)
    steps = (30, 60, 120, 240)
    errors = [(gf.sample(model, x_T=x_start, solver=solver, steps=n, t_start=t_start, t_end=t_end, **options)
               - reference).abs().max().item() for n in steps]
    order = fit_order(steps, errors)
    declared = SOLVERS[solver].expected_order(**options)
    assert declared - 0.3 <= order <= declared + 0.7, f"{solver}{options}: measured {order:.2f}, errors {errors}"


def test_singlestep_warmup_costs_its_extra_evaluations():
    model = mixture().model(gf.VP())
    x_T = _x_T(dtype=torch.float64)
    for solver in ("deis", "unipc"):
        for order, extra in ((1, 0), (2, 1), (3, 4)):
            nfe = []
            gf.sample(model, x_T=x_T, solver=solver, steps=10, solver_order=order, warmup="singlestep",
                      callback=lambda info: nfe.append(info["nfe"]))
            assert nfe[-1] == 10 + extra


# ------------------------------------------------------------------ kinds, per-sample times, edges


@pytest.mark.parametrize("kind", ["eps", "v", "velocity", "score"])
@pytest.mark.parametrize("solver, options", [("deis", {"solver_order": 3}), ("unipc", {"solver_order": 3}),
                                             ("unipc", {"predict_x0": False, "warmup": "singlestep"})])
@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=repr)
def test_network_kind_does_not_change_the_solution(process, solver, options, kind):
    model = mixture().model(process)
    other = gf.Model(lambda x, t: model.predict(x, t, kind), process, prediction=kind)
    x_T = process.prior_sample((8, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    base = gf.sample(model, x_T=x_T, solver=solver, steps=12, **options)
    torch.testing.assert_close(gf.sample(other, x_T=x_T, solver=solver, steps=12, **options), base, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver, options", [("deis", {"solver_order": 3}), ("deis", {"warmup": "singlestep"}),
                                             ("unipc", {"solver_order": 3}), ("unipc", {"solver_order": 3, "warmup": "singlestep"})])
def test_per_sample_start_times_equal_separate_solves(solver, options):
    model = mixture().model(gf.VP())
    t_start = torch.tensor([1.0, 0.6, 0.3, 0.15])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batch = gf.sample(model, x_T=x_T, solver=solver, steps=12, t_start=t_start, **options)
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver=solver, steps=12, t_start=float(t_start[b]), **options)
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-10, atol=1e-10)


LINEAR_CASES = [(solver, {"solver_order": 3, **extra}) for solver in ("deis", "unipc") for extra in ({}, {"warmup": "singlestep"})] + \
    [("unipc", {"solver_order": 3, "predict_x0": False}), ("unipc", {"solver_order": 2, "variant": "bh1"})]


@pytest.mark.parametrize("solver, options", LINEAR_CASES, ids=[f"{s}{o}" for s, o in LINEAR_CASES])
def test_linear_path_from_alpha_0_to_sigma_0(solver, options):
    """LinearPath from t = 1 (alpha = 0) to t = 0 (sigma = 0): both infinite log-SNR steps are first
    order, history at infinite log-SNR is skipped, and the result is the ODE's solution."""
    process = gf.LinearPath()
    model = mixture().model(process)
    x_T = process.prior_sample((8, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = gf.sample(model, x_T=x_T, solver=solver, steps=40, t_end=0.0, **options)
    reference = pf_ode_solution(model, x_T, 1.0, 1e-6)
    assert torch.isfinite(x).all()
    assert (x - reference).abs().max() < 0.05


def test_options_are_checked():
    model = mixture().model(gf.VP())
    for solver, options, match in [("deis", {"solver_order": 4}, "solver_order"), ("unipc", {"solver_order": 0}, "solver_order"),
                                   ("deis", {"warmup": "single"}, "warmup"), ("unipc", {"variant": "bh3"}, "variant"),
                                   ("deis", {"variant": "bh1"}, "variant"), ("deis", {"eta": 0.5}, "eta")]:
        with pytest.raises((ValueError, TypeError), match=match):
            gf.sample(model, (4, 2), solver=solver, steps=5, **options)
    assert SOLVERS["deis"].expected_order() == 2 and SOLVERS["unipc"].expected_order() == 2
    assert [SOLVERS["deis"].expected_order(**o) for o in SOLVERS["deis"].order_test_options] == [1, 2, 2, 3]
    assert torch.isfinite(gf.sample(model, (4, 2), solver="unipc", steps=1, solver_order=3, warmup="singlestep")).all()
