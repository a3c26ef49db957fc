"""Every documented option reaches its target (issue 16, item 9).

README.md is parsed: the solver table of "### Solvers" (every option a row names in backticks
that the solver's constructor takes, with the values the row quotes or an example value), the
paragraphs under it (``thresholding``, ``final_step``, ``warmup="singlestep"``,
``lower_order_final``), every schedule of ``gf.schedules.SCHEDULES`` and each of its options. Each
option is passed through ``gf.sample`` once; options given a value other than their default must
change the result (so they arrived), and an explicit grid with a conflicting ``steps`` is an error.
"""
import inspect
import re
from pathlib import Path

import pytest
import torch

import genflow as gf
from genflow.solvers import SOLVERS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
MODEL = gf.GaussianMixture.ring().model(gf.VP())
X_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

# example values (not the defaults) for options the table names without quoting a value
EXAMPLES = {"restart_intervals": [(2, 1, 0.5, 2.0)], "order": 3, "rtol": 1e-2, "atol": 1e-2, "eta": 0.5, "variant": "reference", "warmup": "singlestep",
            "solver_type": "heun", "solver_order": 2, "lower_order_final": False, "snr": 0.05, "n_corrector": 2,
            "n_steps_each": 2, "max_order": 2, "gamma": 1.5, "max_stage": 2, "noise_scaler": "reverse_sde",
            "integration_points": 50, "predictor_order": 2, "corrector_order": 2, "tau_interval": (0.1, 0.9),
            "r": 0.3}
# DPM-Solver-v3's statistics belong to MODEL's process and log-SNR range (computed once, 20 grid points)
V3_STATISTICS = gf.solvers.dpm_solver_v3.model_statistics(
    MODEL, gf.GaussianMixture.ring().sample(256, generator=torch.Generator().manual_seed(3)).double(), steps=20)
PER_SOLVER = {("dpm_solver_v3", "statistics"): V3_STATISTICS, ("unipc", "variant"): "bh1", ("seeds_2", "solver_type"): "phi_2", ("tcd", "gamma"): 0.5,
              ("exp_heun_2_x0", "solver_type"): "phi_1"}


def _solver_section() -> str:
    start = README.index("### Solvers")
    return README[start:README.index("\n### ", start + 1)]


def _table_rows():
    """``(solver names, row text)`` of the solver table."""
    section = _solver_section()
    for line in section.splitlines():
        match = re.match(r"\| `([a-z0-9_/]+)` \|", line)
        if match:
            first, *rest = match.group(1).split("/")
            names = [first] + [first.rsplit("_", 1)[0] + "_" + r for r in rest]
            yield [n for n in names if n in SOLVERS], line


def _parameters(cls) -> dict:
    found = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.kind is p.KEYWORD_ONLY:
                    found[name] = p.default
    return found


def _documented_cases():
    cases = []
    for names, row in _table_rows():
        quoted = dict(re.findall(r'`([a-z_]+)="([a-z0-9_]+)"', row))
        for name in names:
            params = _parameters(SOLVERS[name])
            for option in sorted(set(re.findall(r"`([a-z_]+)", row)) & set(params)):
                value = PER_SOLVER.get((name, option), quoted.get(option, EXAMPLES.get(option)))
                cases.append((name, option, value))
    return cases


CASES = _documented_cases()


def _sample(solver, steps=6, **options):
    return gf.sample(MODEL, x_T=X_T, solver=solver, steps=steps, generator=[1, 2, 3, 4, 5], **options)


def test_every_registered_solver_has_a_row_in_the_table():
    documented = {name for names, _ in _table_rows() for name in names}
    assert not set(SOLVERS) - documented, f"README's solver table has no row for {sorted(set(SOLVERS) - documented)}"


def test_the_table_is_parsed():
    assert {name for name, _, _ in CASES} >= {"lms", "ddpm", "dpmpp_3m", "deis", "unipc", "pc", "ald", "rk45"}
    assert len(CASES) >= 18


@pytest.mark.parametrize("solver, option, value", CASES)
def test_each_documented_solver_option_arrives(solver, option, value):
    assert value is not None, f"README names {option!r} for {solver!r}: add an example value to EXAMPLES"
    steps = 16 if option == "lower_order_final" else 6
    result = _sample(solver, steps=steps, **{option: value})
    if value != _parameters(SOLVERS[solver]).get(option, SOLVERS[solver].default_eta):
        assert not torch.equal(result, _sample(solver, steps=steps)), f"{option}={value!r} changed nothing"


def test_quoted_values_of_the_table_are_all_tried():
    ddpm = next(row for names, row in _table_rows() if names == ["ddpm"])
    assert set(re.findall(r'"([a-z]+)"', ddpm)) == {"small", "large"}
    assert not torch.equal(_sample("ddpm", variance="small"), _sample("ddpm", variance="large"))


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_takes_thresholding_and_final_step(solver):
    section = _solver_section()
    for option in ("thresholding=True", "dynamic_thresholding_ratio", "sample_max_value", 'final_step="x0"'):
        assert f"`{option}`" in section
    _sample(solver, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    _sample(solver, final_step="x0")


def test_warmup_singlestep_for_the_solvers_the_paragraph_names():
    paragraph = re.search(r'`warmup="singlestep"` \(genflow only; ([^)]*)\)', _solver_section()).group(1)
    names = re.findall(r"`([a-z0-9_]+)`", paragraph)
    assert set(names) == {"dpmpp_2m", "dpmpp_3m", "deis", "unipc"}
    for name in names:
        assert not torch.equal(_sample(name, warmup="singlestep"), _sample(name))


# example values (not the defaults) of the schedules' options
SCHEDULE_EXAMPLES = {"rho": 3.0, "mu": 0.5, "beta": 0.8, "alpha": 0.4, "threshold_noise": 0.05, "linear_steps": 2,
                     "num_train_timesteps": 500, "model_type": "sdxl", "discrete": False}


def _schedule_classes() -> dict:
    """Every registered schedule class by name (``gf.schedules.SCHEDULES``)."""
    found, stack = {}, [gf.schedules.Schedule]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.name:
            found[cls.name] = cls
    return found


SCHEDULE_CASES = [(name, option) for name, cls in sorted(_schedule_classes().items())
                  for option in sorted({*cls.defaults, "discrete"} if cls.discrete_default else cls.defaults)]
DISCRETE_MODEL = gf.GaussianMixture.ring().model(gf.DiscreteVP.linear(100))  # where discrete= changes the grid


@pytest.mark.parametrize("schedule", gf.schedules.SCHEDULES)
def test_every_schedule_is_documented_and_runs_through_gf_sample(schedule):
    assert f"`{schedule}`" in _solver_section(), f"README's solver section does not name the {schedule!r} schedule"
    assert _sample("dpmpp_2m", schedule=schedule).shape == X_T.shape


@pytest.mark.parametrize("schedule, option", SCHEDULE_CASES)
def test_each_schedule_option_is_documented_and_arrives(schedule, option):
    """Each option of each schedule (``gf.time_grid``'s keywords) is passed through ``gf.sample``
    and changes the grid (so it arrived); README names it."""
    value = SCHEDULE_EXAMPLES.get(option)
    assert value is not None, f"add an example value for the {schedule!r} schedule's {option!r} to SCHEDULE_EXAMPLES"
    model = DISCRETE_MODEL if option == "discrete" else MODEL
    result = gf.sample(model, x_T=X_T, solver="dpmpp_2m", steps=6, schedule=schedule, generator=[1, 2, 3, 4, 5],
                       **{option: value})
    grid = gf.time_grid(model.process, 6, schedule, **{option: value})
    assert not torch.equal(grid, gf.time_grid(model.process, 6, schedule)), f"{schedule}: {option}={value!r}"
    assert torch.equal(result, gf.sample(model, x_T=X_T, solver="dpmpp_2m", schedule=grid, generator=[1, 2, 3, 4, 5]))
    assert f"`{option}" in _solver_section(), f"README's solver section does not name {schedule!r}'s option {option!r}"


def test_rho_of_the_karras_schedule():
    karras = _sample("dpmpp_2m", schedule="karras")
    assert torch.equal(_sample("dpmpp_2m", schedule="karras", rho=7.0), karras)
    assert not torch.equal(_sample("dpmpp_2m", schedule="karras", rho=5.0), karras)
    grid = gf.time_grid(MODEL.process, 6, "karras", rho=5.0)
    assert torch.equal(_sample("dpmpp_2m", schedule="karras", rho=5.0), gf.sample(
        MODEL, x_T=X_T, solver="dpmpp_2m", schedule=grid, generator=[1, 2, 3, 4, 5]))


def test_explicit_grid_and_conflicting_steps():
    grid = gf.time_grid(MODEL.process, 6)
    assert torch.equal(_sample("euler", steps=6, schedule=grid), _sample("euler", steps=6))
    with pytest.raises(ValueError, match="steps=5 conflicts with the explicit grid.*6 steps"):
        _sample("euler", steps=5, schedule=grid)
    with pytest.raises(ValueError, match="rho"):
        _sample("euler", steps=6, schedule=grid, rho=5.0)


def test_precision_and_ownership_options_of_the_solver_section():
    paragraph = re.search(r"Precision and memory: (.*?)\n\n", README, re.S).group(1)
    options = set(re.findall(r"([a-z_]+)=", " ".join(re.findall(r"`([^`]*)`", paragraph))))
    assert options >= {"state_dtype", "model_reuses_buffers"}
    half = X_T.half()
    result = gf.sample(MODEL, x_T=half, solver="dpmpp_2m", steps=6, state_dtype=torch.float64)
    assert result.dtype == torch.float16
    assert not torch.equal(result, gf.sample(MODEL, x_T=half, solver="dpmpp_2m", steps=6, state_dtype=torch.float16))
    assert torch.equal(_sample("dpmpp_2m", model_reuses_buffers=True), _sample("dpmpp_2m"))


# -- the engine's section (``gf.solve``): its ODE and SDE solver tables and the options it names --

Y0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
W = torch.tensor([[0.4, -0.3], [0.2, 0.5]], dtype=torch.float64)
DRIFT = gf.ODE(lambda t, y: torch.tanh(y @ W) - 0.1 * y)
PEER_OPTIONS = {"levy_area_approximation"}  # torchsde's BrownianInterval option, named for the peer


def _engine_section() -> str:
    start = README.index("### The general SDE/ODE engine")
    return README[start:README.index("\n### ", start + 1)]


def _engine_table(header: str):
    """``(solver, row cells)`` of the engine table whose first header cell is ``header``."""
    section = _engine_section()
    table = section[section.index(f"| {header} |"):]
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            return
        cells = [c.strip() for c in line.strip("|").split("|")]
        yield cells[0].strip("`"), cells


def _sde(noise: str, sde_type: str = "ito") -> gf.SDE:
    diffusion = (lambda t, y: torch.full_like(y, 0.3)) if noise == "additive" else (lambda t, y: 0.3 * torch.cos(y))
    return gf.SDE(lambda t, y: -y, diffusion, noise=noise, sde_type=sde_type)


@pytest.mark.parametrize("solver, cells", list(_engine_table("ODE solver")), ids=lambda v: v if isinstance(v, str) else "")
def test_each_documented_ode_solver_runs_through_gf_solve(solver, cells):
    fixed = gf.solve(DRIFT, Y0, 0.0, 1.0, solver=solver, steps=8)
    assert fixed.shape == Y0.shape and torch.isfinite(fixed).all()
    if cells[2] != "—":  # an embedded pair: adaptive without steps
        adaptive = gf.solve(DRIFT, Y0, 0.0, 1.0, solver=solver, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(adaptive, gf.solve(DRIFT, Y0, 0.0, 1.0, solver="rk4", steps=400), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver, cells", list(_engine_table("SDE solver")), ids=lambda v: v if isinstance(v, str) else "")
def test_each_documented_sde_solver_runs_through_gf_solve(solver, cells):
    noise_kinds = cells[3]
    noise = "diagonal" if "diagonal" in noise_kinds or "all four" in noise_kinds else "additive"
    sde_type = "stratonovich" if cells[4].startswith("Stratonovich") else "ito"
    options = {"rtol": 1e-2, "atol": 1e-2, "brownian": "brownian_tree"} if "adaptive" in solver else {"steps": 8}
    y1 = gf.solve(_sde(noise, sde_type), Y0, 0.0, 1.0, solver=solver, generator=list(range(6)), **options)
    assert y1.shape == Y0.shape and torch.isfinite(y1).all()


def _solve_ode(**options):
    return gf.solve(DRIFT, Y0, 0.0, 1.0, solver=options.pop("solver", "dopri5"), **options)


def _solve_sde(**options):
    options.setdefault("steps", 8)
    return gf.solve(_sde("diagonal"), Y0, 0.0, 1.0, solver=options.pop("solver", "euler_maruyama"), **options)


def _differs(a, b) -> bool:
    return not torch.equal(a, b)


def _check_steps():
    assert _differs(_solve_ode(solver="heun", steps=4), _solve_ode(solver="heun", steps=8))


def _check_ts():
    grid = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    assert _differs(_solve_ode(solver="heun", ts=grid), _solve_ode(solver="heun", steps=3))


def _check_tolerance(option):
    assert _differs(_solve_ode(**{option: 1e-2}), _solve_ode(**{option: 1e-9}))


def _check_error_norm():
    assert _differs(_solve_ode(rtol=1e-3, atol=1e-3, error_norm="batch"), _solve_ode(rtol=1e-3, atol=1e-3))


def _check_saveat_and_dense():
    times = torch.linspace(0, 1, 5, dtype=torch.float64)
    solution = _solve_ode(saveat=times, dense=True)
    assert solution.ys.shape == (5, *Y0.shape)
    torch.testing.assert_close(solution.evaluate(1.0), solution.ys[-1], rtol=0, atol=1e-12)


def _check_callback():
    seen = []
    _solve_ode(solver="euler", steps=5, callback=lambda info: seen.append(info["i"]))
    assert seen == [0, 1, 2, 3, 4]


def _check_progress():
    assert torch.equal(_solve_ode(solver="euler", steps=5, progress=True), _solve_ode(solver="euler", steps=5))


def _check_check_finite():
    blowup = gf.ODE(lambda t, y: y * float("inf"))
    with pytest.raises(gf.NonFiniteError):
        gf.solve(blowup, Y0, 0.0, 1.0, solver="euler", steps=2)
    assert not torch.isfinite(gf.solve(blowup, Y0, 0.0, 1.0, solver="euler", steps=2, check_finite=False)).all()


def _check_generator():
    assert _differs(_solve_sde(generator=list(range(6))), _solve_sde(generator=list(range(1, 7))))


def _check_brownian():
    assert _differs(_solve_sde(generator=0, brownian="brownian_tree"), _solve_sde(generator=0))


def _check_derivative_free():
    assert _differs(_solve_sde(solver="milstein", generator=0, derivative_free=True),
                    _solve_sde(solver="milstein", generator=0))


def _check_noise():
    scalar = gf.solve(_sde("scalar"), Y0, 0.0, 1.0, solver="euler_maruyama", steps=8, generator=0)
    assert _differs(scalar, _solve_sde(generator=0))


def _check_cuda_graph():
    if torch.cuda.is_available():
        graphed = gf.solve(DRIFT, Y0.cuda(), 0.0, 1.0, solver="rk4", steps=8, cuda_graph=True)
        torch.testing.assert_close(graphed.cpu(), _solve_ode(solver="rk4", steps=8), rtol=0, atol=1e-12)
    else:
        with pytest.raises((ValueError, RuntimeError), match="(?i)cuda"):
            _solve_ode(solver="rk4", steps=8, cuda_graph=True)


class _AdjointDrift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 2).double()
        torch.nn.init.constant_(self.net.weight, 0.3)

    def forward(self, t, y):
        return torch.tanh(self.net(y))


def _adjoint_gradient(drift, **options):
    y0 = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    y = gf.solve(gf.ODE(drift), y0, 0.0, 1.0, solver="dopri5", rtol=1e-3, atol=1e-3, **options)
    return torch.autograd.grad(y.sum(), [y0, drift.net.weight])


def _check_adjoint():
    drift = _AdjointDrift()
    backprop, adjoint = _adjoint_gradient(drift), _adjoint_gradient(drift, adjoint=True)
    assert not torch.equal(backprop[1], adjoint[1]) and torch.allclose(backprop[1], adjoint[1], atol=1e-2)


def _check_adjoint_params():
    drift = _AdjointDrift()
    plain = lambda t, y: drift(t, y)  # not a Module: parameters only through adjoint_params
    y0 = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="not in adjoint_params"):
        gf.solve(gf.ODE(plain), y0, 0.0, 1.0, solver="rk4", steps=4, adjoint=True).sum().backward()
    y = gf.solve(gf.ODE(plain), y0, 0.0, 1.0, solver="rk4", steps=4, adjoint=True,
                 adjoint_params=drift.parameters())
    y.sum().backward()
    assert drift.net.weight.grad is not None


def _check_adjoint_tolerance(name):
    drift = _AdjointDrift()
    loose = _adjoint_gradient(drift, adjoint=True, **{name: 1e-1})
    tight = _adjoint_gradient(drift, adjoint=True, **{name: 1e-10})
    assert not torch.equal(loose[1], tight[1])


def _check_state_dtype():
    decay, seen, y0 = gf.ODE(lambda t, y: -y), [], Y0.to(torch.float16)
    y = gf.solve(decay, y0, 0.0, 1.0, solver="rk4", steps=4, state_dtype=torch.float64,
                 callback=lambda info: seen.append(info["x"].dtype))
    assert y.dtype == torch.float16 and set(seen) == {torch.float64}
    with pytest.raises(TypeError, match="state_dtype"):
        gf.solve(decay, y0, 0.0, 1.0, solver="rk4", steps=4, state_dtype=torch.int32)


ENGINE_CHECKS = {"steps": _check_steps, "ts": _check_ts, "rtol": lambda: _check_tolerance("rtol"),
                 "atol": lambda: _check_tolerance("atol"), "error_norm": _check_error_norm,
                 "saveat": _check_saveat_and_dense, "dense": _check_saveat_and_dense, "callback": _check_callback,
                 "progress": _check_progress, "check_finite": _check_check_finite, "generator": _check_generator,
                 "brownian": _check_brownian, "derivative_free": _check_derivative_free, "noise": _check_noise,
                 "cuda_graph": _check_cuda_graph, "adjoint": _check_adjoint, "adjoint_params": _check_adjoint_params,
                 "adjoint_rtol": lambda: _check_adjoint_tolerance("adjoint_rtol"),
                 "adjoint_atol": lambda: _check_adjoint_tolerance("adjoint_atol"), "state_dtype": _check_state_dtype}


def _engine_options():
    """The keyword options README's engine prose names (fenced examples and positional arguments excluded)."""
    prose = re.sub(r"```.*?```", "", _engine_section(), flags=re.S)
    tokens = re.findall(r"`([^`]*)`", prose)
    named = {m for token in tokens for m in re.findall(r"\b([a-z_]+)=", token)}
    keywords = {name for name, p in inspect.signature(gf.solve).parameters.items() if p.kind is p.KEYWORD_ONLY}
    named |= {token for token in tokens if token in keywords}
    return sorted(named - {"solver"} - PEER_OPTIONS)


def test_the_engine_section_is_parsed():
    assert len(list(_engine_table("ODE solver"))) >= 10 and len(list(_engine_table("SDE solver"))) >= 7
    assert {"steps", "ts", "rtol", "atol", "saveat", "dense", "brownian", "error_norm"} <= set(_engine_options())


@pytest.mark.parametrize("option", _engine_options())
def test_each_documented_engine_option_arrives(option):
    assert option in ENGINE_CHECKS, f"README's gf.solve section names {option!r}: add a check to ENGINE_CHECKS"
    ENGINE_CHECKS[option]()


# -- README's reliability table: every test it names exists --

def _reliability_references():
    """``(file, function or None)`` for every test the "What genflow does with bad input" table names
    (``tests/x.py::f``, ``tests/x.py`` and the ``::g`` shorthands that follow a file)."""
    start = README.index("### What genflow does with bad input")
    table = README[start:README.index("\n### ", start + 1)]
    references = []
    for row in (line for line in table.splitlines() if line.startswith("| ") and "tests/" in line):
        current = None
        for token in re.findall(r"`((?:tests/[\w/.*-]+)?(?:::[\w*]+)?)`", row.rsplit("|", 2)[-2]):
            path, _, function = token.partition("::")
            current = path or current
            references.append((current, function or None))
    return references


def test_every_test_the_reliability_table_names_exists():
    references = _reliability_references()
    assert len(references) >= 40
    root = Path(__file__).resolve().parents[1]
    for path, function in references:
        target = root / path
        assert target.exists(), f"README's reliability table names {path}, which does not exist"
        if function is not None and target.is_file():
            pattern = function.replace("*", r"\w*")
            assert re.search(rf"^def {pattern}\(", target.read_text(), re.M), f"{path}::{function} does not exist"
