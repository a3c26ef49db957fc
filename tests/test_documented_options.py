"""Every documented option reaches its target (issue 16, item 9).

README.md is parsed: the solver table of "### Solvers" (every option a row names in backticks
that the solver's constructor takes, with the values the row quotes or an example value), the
paragraphs under it (``thresholding``, ``final_step``, ``warmup="singlestep"``,
``lower_order_final``) and the "Schedules (`schedule=`)" line (every schedule, ``rho``). Each
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
EXAMPLES = {"order": 3, "rtol": 1e-2, "atol": 1e-2, "eta": 0.5, "variant": "reference", "warmup": "singlestep",
            "solver_type": "heun", "solver_order": 2, "lower_order_final": False, "snr": 0.05, "n_corrector": 2,
            "n_steps_each": 2, "max_order": 2, "gamma": 1.5, "max_stage": 2, "noise_scaler": "reverse_sde",
            "integration_points": 50, "predictor_order": 2, "corrector_order": 2, "tau_interval": (0.1, 0.9),
            "r": 0.3}
PER_SOLVER = {("unipc", "variant"): "bh1", ("seeds_2", "solver_type"): "phi_2"}


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


def test_every_documented_schedule_and_rho():
    line = re.search(r"Schedules \(`schedule=`\): (.*?)\n\n", README, re.S).group(1)
    schedules = re.findall(r"`([a-z]+)`", line)
    assert set(schedules) >= set(gf.schedules.SCHEDULES) and "rho" in schedules
    for schedule in gf.schedules.SCHEDULES:
        _sample("dpmpp_2m", schedule=schedule)
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
