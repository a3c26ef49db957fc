"""Every numeric type (issue 16, item 5): Python, NumPy and 0-d tensor integers and floats are
accepted wherever ``gf.sample``, ``gf.time_grid``, the processes and the solvers expect an int or
a float, with results equal to the Python-number call; anything else is a ``TypeError`` naming
the argument (strings for times included)."""
import numpy as np
import pytest
import torch

import genflow as gf

MODEL = gf.GaussianMixture.ring().model(gf.VP())
X_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _ints(v):
    return [v, np.int64(v), np.int32(v), torch.tensor(v), torch.tensor(v, dtype=torch.int32)]


def _floats(v):
    return [v, np.float64(v), np.float32(v), torch.tensor(v, dtype=torch.float64), torch.tensor(v)]


def _sample(**options):
    options = {"solver": "ddim", "steps": 5, **options}
    return gf.sample(MODEL, x_T=X_T, generator=[1, 2, 3, 4], **options)


@pytest.mark.parametrize("argument, values, extra", [
    ("steps", _ints(5), {}),
    ("eta", [0.5, np.float64(0.5), torch.tensor(0.5, dtype=torch.float64)], {}),
    ("rho", _floats(5.0)[:4], {"schedule": "karras"}),
    ("t_start", _floats(0.75)[:4], {}),
    ("t_end", _floats(0.125)[:4], {}),
])
def test_gf_sample_accepts_every_numeric_type(argument, values, extra):
    expected = _sample(**{argument: values[0]}, **extra)
    for value in values[1:]:
        assert torch.equal(_sample(**{argument: value}, **extra), expected), type(value)


@pytest.mark.parametrize("argument, value", [
    ("steps", "5"), ("steps", [5]), ("steps", 5.5), ("steps", True), ("steps", torch.ones(2, dtype=torch.int64)),
    ("eta", "0.5"), ("eta", [0.5]), ("rho", "7"), ("t_start", "0.5"), ("t_end", "0"), ("t_start", b"1"),
])
def test_gf_sample_rejects_other_types_naming_the_argument(argument, value):
    extra = {"schedule": "karras"} if argument == "rho" else {}
    with pytest.raises(TypeError, match=argument):
        _sample(**{argument: value}, **extra)


@pytest.mark.parametrize("solver, argument, values", [
    ("rk45", "rtol", _floats(2.0 ** -10)), ("rk45", "atol", _floats(2.0 ** -10)),
    ("pc", "snr", _floats(0.125)), ("pc", "n_corrector", _ints(2)),
    ("ald", "n_steps_each", _ints(2)), ("dpmpp_2m", "dynamic_thresholding_ratio", _floats(0.875)),
    ("lms", "order", _ints(3)), ("rk45", "max_steps", _ints(500)), ("deis", "solver_order", _ints(2)),
    ("sde_adaptive", "safety", _floats(0.75)), ("dpmpp_2m_sde", "eta", _floats(0.5)),
])
def test_solver_options_accept_every_numeric_type(solver, argument, values):
    extra = {"thresholding": True} if argument == "dynamic_thresholding_ratio" else {}
    expected = _sample(solver=solver, **{argument: values[0]}, **extra)
    for value in values[1:]:
        assert torch.equal(_sample(solver=solver, **{argument: value}, **extra), expected), type(value)


@pytest.mark.parametrize("solver, argument", [
    ("pc", "snr"), ("pc", "n_corrector"), ("ald", "step_lr"), ("dpmpp_2m", "sample_max_value"), ("rk45", "rtol"),
    ("sde_adaptive", "safety")])
def test_solver_options_reject_strings_naming_the_argument(solver, argument):
    with pytest.raises(TypeError, match=argument):
        _sample(solver=solver, **{argument: "1"})


@pytest.mark.parametrize("make, params", [
    (gf.VP, {"beta_min": 0.2, "beta_max": 10.0, "T": 0.9, "t_min": 2e-3}),
    (gf.SubVP, {"beta_min": 0.2, "beta_max": 10.0}),
    (gf.VE, {"sigma_min": 0.02, "sigma_max": 30.0}),
    (gf.CosineVP, {"s": 0.01}),
    (gf.EDM, {"sigma_min": 0.01, "sigma_max": 40.0, "sigma_data": 0.6}),
    (gf.LinearPath, {"sigma_min": 0.01, "t_min": 1e-3}),
])
def test_process_parameters_accept_every_numeric_type(make, params):
    expected = make(**params)
    for convert in (np.float64, np.float32, lambda v: torch.tensor(v, dtype=torch.float64)):
        process = make(**{k: convert(v) for k, v in params.items()})
        if convert is np.float32:  # float32 rounding changes the values, not the type
            assert all(type(getattr(process, k)) is float for k in params)
            continue
        assert process.cache_key() == expected.cache_key()
    for name in params:
        with pytest.raises(TypeError, match=name):
            make(**{**params, name: str(params[name])})


def test_discrete_vp_and_time_grid_counts():
    assert gf.DiscreteVP.linear(np.int64(50)).num_train_timesteps == 50
    assert gf.DiscreteVP.linear(torch.tensor(50)).num_train_timesteps == 50
    with pytest.raises(TypeError, match="num_train_timesteps"):
        gf.DiscreteVP.linear("50")
    process = gf.VP()
    expected = gf.time_grid(process, 6, "karras", 0.9, 0.01, rho=5.0)
    for steps, t0, t1, rho in [(np.int64(6), np.float64(0.9), np.float32(0.01), np.float64(5.0)),
                               (torch.tensor(6), torch.tensor(0.9, dtype=torch.float64), 0.01, torch.tensor(5.0))]:
        torch.testing.assert_close(gf.time_grid(process, steps, "karras", t0, t1, rho=rho), expected,
                                   rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="t_start.*string"):
        gf.time_grid(process, 6, "logsnr", "0.9")
    with pytest.raises(TypeError, match="schedule.*string"):
        gf.schedules.validate_grid("0.9", process)


def test_mixture_constructors_accept_every_numeric_type():
    expected = gf.GaussianMixture.ring(4, 2.0, 0.25).means
    for k, radius, std in [(np.int64(4), np.float64(2.0), np.float32(0.25)), (torch.tensor(4), torch.tensor(2.0), 0.25)]:
        torch.testing.assert_close(gf.GaussianMixture.ring(k, radius, std).means, expected)
    assert gf.GaussianMixture.grid(np.int32(2), torch.tensor(1.0)).num_components == 4
    assert gf.GaussianMixture.ring().sample(np.int64(3)).shape == (3, 2)
    for bad in ({"k": "8"}, {"radius": "4"}, {"std": [0.5]}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            gf.GaussianMixture.ring(**bad)


@pytest.mark.parametrize("seed", _ints(7)[1:], ids=["np.int64", "np.int32", "tensor", "tensor_int32"])
def test_integer_seeds_of_every_type(seed):
    """``generator=`` takes a NumPy or 0-d tensor integer as the int seed it holds (gf.sample, gf.solve)."""
    options = {"solver": "euler_ancestral", "steps": 3}
    assert torch.equal(gf.sample(MODEL, (4, 2), generator=seed, **options), gf.sample(MODEL, (4, 2), generator=7, **options))
    sde = gf.SDE(lambda t, y: -y, lambda t, y: torch.full_like(y, 0.3), noise="additive")
    assert torch.equal(gf.solve(sde, X_T, 0.0, 1.0, solver="euler_maruyama", steps=4, generator=seed),
                       gf.solve(sde, X_T, 0.0, 1.0, solver="euler_maruyama", steps=4, generator=7))


@pytest.mark.parametrize("seed", [np.float64(7.0), torch.tensor(7.0), torch.tensor(True), np.bool_(True), "7"])
def test_non_integer_seeds_are_refused_naming_the_generator(seed):
    with pytest.raises((TypeError, ValueError), match="generator"):
        gf.sample(MODEL, (4, 2), generator=seed, solver="euler_ancestral", steps=3)


@pytest.mark.parametrize("convert", [np.float64, lambda v: torch.tensor(v, dtype=torch.float64)], ids=["numpy", "tensor"])
def test_gf_solve_numbers_of_every_type(convert):
    ode = gf.ODE(lambda t, y: torch.tanh(y) - 0.1 * y)
    expected = gf.solve(ode, X_T, 0.0, 1.0, solver="rk4", steps=5)
    assert torch.equal(gf.solve(ode, X_T, convert(0.0), convert(1.0), solver="rk4", steps=np.int64(5)), expected)
    adaptive = gf.solve(ode, X_T, 0.0, 1.0, solver="dopri5", rtol=1e-4, atol=1e-5)
    assert torch.equal(gf.solve(ode, X_T, 0.0, 1.0, solver="dopri5", rtol=convert(1e-4), atol=convert(1e-5)), adaptive)
    for options, name in (({"steps": "5"}, "steps"), ({"steps": 5.5}, "steps"), ({"rtol": "1e-3"}, "rtol")):
        with pytest.raises(TypeError, match=name):
            gf.solve(ode, X_T, 0.0, 1.0, solver="rk4" if "steps" in options else "dopri5", **options)
    with pytest.raises(TypeError, match="t0"):
        gf.solve(ode, X_T, "0", 1.0, solver="rk4", steps=3)
