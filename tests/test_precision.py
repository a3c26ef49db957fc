"""Mixed-precision state (issue 16, item 4): ``gf.sample`` keeps the solver state and history
in ``state_dtype`` (float32 by default for float16/bfloat16 inputs, float64 on request) while
the model runs in the input's dtype, and returns the sample in the input's dtype.

Stated tolerances, on the 8-Gaussian ring (modes at radius 4) under VP, 64 samples, 10 steps,
the exact mixture model rounding its output to the input dtype, against the float32 solve:
the largest per-sample deviation is at most 0.06 (float16) and 0.3 (bfloat16). Solvers whose
control flow amplifies the model's rounding (accept/reject decisions of ``rk45`` and
``sde_adaptive``, which make a sample another discretisation of the same path; ``pc``'s
per-sample Langevin step ``(snr |z| / |score|)^2`` with a score read from a rounded ``x0`` at
small sigma) are held to the median sample instead: 0.1 (float16) and 0.3 (bfloat16).
"""
import pytest
import torch

import genflow as gf
from genflow.solvers import SOLVERS

MODEL = gf.GaussianMixture.ring().model(gf.VP())
BATCH = 64
X_T = gf.VP().sigma(1.0) * torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(0))
OPTIONS = {"rk45": {"rtol": 1e-3, "atol": 1e-3}}
AMPLIFYING = {"rk45", "sde_adaptive", "pc"}
TOLERANCE = {torch.float16: 0.06, torch.bfloat16: 0.3}
MEDIAN_TOLERANCE = {torch.float16: 0.1, torch.bfloat16: 0.3}


def _solve(name, x_T, **options):
    return gf.sample(MODEL, x_T=x_T, solver=name, steps=10, generator=list(range(BATCH)),
                     **OPTIONS.get(name, {}), **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_half_precision_input_within_tolerance_of_float32(name, dtype):
    reference = _solve(name, X_T)
    result = _solve(name, X_T.to(dtype))
    assert result.dtype == dtype
    deviation = (result.float() - reference).abs().amax(dim=1)
    if name in AMPLIFYING:
        assert float(deviation.median()) <= MEDIAN_TOLERANCE[dtype], name
    else:
        assert float(deviation.max()) <= TOLERANCE[dtype], name


def test_model_runs_in_the_input_dtype_and_state_in_state_dtype():
    seen = []

    def net(x, t):
        seen.append(x.dtype)
        return MODEL.net(x, t)

    model = gf.Model(net, MODEL.process, "x0")
    steps = []
    out = gf.sample(model, x_T=X_T.half(), solver="dpmpp_2m", steps=4, callback=lambda info: steps.append(info["x"].dtype))
    assert out.dtype == torch.float16 and set(seen) == {torch.float16} and set(steps) == {torch.float32}
    seen.clear()
    steps.clear()
    out = gf.sample(model, x_T=X_T.half(), solver="dpmpp_2m", steps=4, state_dtype=torch.float64,
                    callback=lambda info: steps.append(info["x"].dtype))
    assert out.dtype == torch.float16 and set(seen) == {torch.float16} and set(steps) == {torch.float64}
    out, trajectory = gf.sample(model, (3, 2), dtype=torch.bfloat16, solver="euler", steps=3, generator=0,
                                return_trajectory=True)
    assert out.dtype == trajectory.dtype == torch.bfloat16


def test_float64_state_for_a_float32_model_matches_float64_closely():
    reference = _solve("dpmpp_3m", X_T.double())
    result = _solve("dpmpp_3m", X_T, state_dtype=torch.float64)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), reference, rtol=0, atol=1e-5)


def test_half_state_on_request_and_bad_state_dtype():
    assert _solve("euler", X_T.half(), state_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(TypeError, match="state_dtype"):
        _solve("euler", X_T, state_dtype=torch.int32)
    with pytest.raises(TypeError, match="state_dtype"):
        _solve("euler", X_T, state_dtype="float32")
    with pytest.raises(TypeError, match="dtype"):
        gf.sample(MODEL, (2, 2), dtype=torch.int64)
