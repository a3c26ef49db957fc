"""log_likelihood's exact-divergence schemes, error norms and divergence detection (check_finite)."""
import pytest
import torch

import genflow as gf
from genflow import divergence
from genflow.cnf import CNFNet, cnf_log_likelihood


def _mlp_model(dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim + 1, 16, generator=g, dtype=torch.float64)
    w2 = torch.randn(16, dim, generator=g, dtype=torch.float64) / 4

    def net(x, t):
        return torch.tanh(torch.cat([x, t[:, None].to(x.dtype)], 1) @ w1.to(x.dtype)) @ w2.to(x.dtype)
    return gf.Model(net, gf.LinearPath(), prediction="velocity")


def test_exact_schemes_agree_and_the_choice_is_timed_then_kept(monkeypatch):
    model = _mlp_model()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.full((5,), 0.4, dtype=torch.float64)
    v_l, div_l = divergence.DivergenceDrift(model, "exact", (), "loop")(x, t)
    v_b, div_b = divergence.DivergenceDrift(model, "exact", (), "batched")(x, t)
    jac = torch.func.vmap(torch.func.jacrev(lambda y, s: model.velocity(y[None], s[None])[0]))(x, t)
    torch.testing.assert_close(div_l, jac.diagonal(dim1=1, dim2=2).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div_b, div_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_b, v_l, rtol=0, atol=0)
    monkeypatch.setattr(divergence, "times_schemes", lambda device: True)  # as on a GPU (CPU always loops)
    drift = divergence.DivergenceDrift(model, "exact", (), None)
    for _ in range(2 * divergence.EXACT_ROUNDS):
        torch.testing.assert_close(drift(x, t)[1], div_l, rtol=1e-12, atol=1e-12)
    entry = divergence.EXACT_CHOICE.get((model, (5, 3), torch.float64, "cpu"))
    assert entry[0] in divergence.EXACT_SCHEMES and len(entry[1]) == 2 * divergence.EXACT_ROUNDS
    drift(x, t)
    assert len(entry[1]) == 2 * divergence.EXACT_ROUNDS  # decided: no more timing


def test_batch_error_norm_takes_one_step_size_and_stays_accurate():
    model = _mlp_model(2, seed=3)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = gf.log_likelihood(model, x, method="exact", rtol=1e-8, atol=1e-8)
    lp_s, info_s = gf.log_likelihood(model, x, method="exact", rtol=1e-5, atol=1e-5, return_info=True)
    lp_b, info_b = gf.log_likelihood(model, x, method="exact", rtol=1e-5, atol=1e-5, error_norm="batch",
                                     return_info=True)
    assert (info_b["steps"] == info_b["steps"][0]).all()  # one step size: every sample takes the same steps
    assert info_b["nfe"] <= info_s["nfe"]
    assert (lp_s - ref).abs().max() < 1e-3 and (lp_b - ref).abs().max() < 1e-3
    with pytest.raises(ValueError, match="error_norm"):
        gf.log_likelihood(model, x, error_norm="max")


def _blowup_model(t_blow):
    """A velocity whose samples with x[:, 0] > 0 turn NaN once t > t_blow."""
    def net(x, t):
        bad = (x[:, :1] > 0) & (t[:, None] > t_blow)
        return torch.where(bad, torch.full_like(x, float("nan")), -0.5 * x)
    return gf.Model(net, gf.LinearPath(), prediction="velocity")


@pytest.mark.parametrize("solver", ["rk45", "rk4"])
def test_check_finite_names_the_step_time_and_count(solver):
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-2.0, 1.0]], dtype=torch.float64)
    model = _blowup_model(0.5)
    steps = None if solver == "rk45" else 8
    # the engine's report: the time (rk45: where the error estimate stays NaN down to the smallest
    # step, just short of t = 0.5; rk4: the step and its interval) and the count of diverged samples
    match = (r"gf.log_likelihood: solver 'dopri5' diverged at t=\[0\.49999.*2 of 4 samples diverged"
             if solver == "rk45" else
             r"gf.log_likelihood: solver 'rk4' produced NaN/Inf at step 5 of 8 \(t 0\.5 -> 0\.625\): 2 of 4 samples")
    with pytest.raises(gf.NonFiniteError, match=match):
        gf.log_likelihood(model, x, method="exact", solver=solver, steps=steps)
    if solver == "rk4":  # unchecked: the NaN comes back silently for exactly those samples
        lp = gf.log_likelihood(model, x, method="exact", solver=solver, steps=steps, check_finite=False)
        assert torch.isnan(lp).tolist() == [True, False, True, False]


def test_non_finite_input_and_check_finite_for_cnf_log_likelihood():
    x = torch.tensor([[float("inf"), 0.0], [0.5, 0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x must be finite: 1 of its 2 samples"):  # bad input, not divergence
        gf.log_likelihood(_mlp_model(2), x, method="exact")
    net = CNFNet(2, hidden=8, depth=1).double()
    with torch.no_grad():
        net.layers[-1].bias.fill_(float("nan"))
    with pytest.raises(gf.NonFiniteError, match=r"step 1 .*2 of 2 samples"):
        cnf_log_likelihood(net, torch.zeros(2, 2, dtype=torch.float64), steps=2, generator=0)
    assert torch.isnan(cnf_log_likelihood(net, torch.zeros(2, 2, dtype=torch.float64), steps=2, generator=0,
                                          check_finite=False)).all()


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    model = _mlp_model(2, seed=5)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eager = gf.log_likelihood(model, x, method="exact", rtol=1e-6, atol=1e-6)
    with pytest.warns(RuntimeWarning, match="torch.compile failed on the drift .*no compiler here"):
        lp = gf.log_likelihood(model, x, method="exact", rtol=1e-6, atol=1e-6, compile=True)
    torch.testing.assert_close(lp, eager, rtol=1e-9, atol=1e-9)  # the torch.func drift: same trace
    fn = divergence.COMPILED.get((model, (16, 2), torch.float64, "cpu"))
    assert fn is not None and fn.__name__ == "drift"
    with pytest.raises(ValueError, match="compile=True is for method='exact'"):
        gf.log_likelihood(model, x, compile=True)
