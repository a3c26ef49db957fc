"""Model kinds and their conversions, time mapping, conditioning and guidance."""
import pytest
import torch

import genflow as gf
from genflow.models import KINDS


def _kind_value(kind, x0, eps, alpha, sigma, dalpha, dsigma):
    return {"eps": eps, "x0": x0, "score": -eps / sigma, "v": alpha * eps - sigma * x0,
            "velocity": dalpha * x0 + dsigma * eps}[kind]


@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(), gf.LinearPath(), gf.VE(), gf.SubVP()], ids=repr)
@pytest.mark.parametrize("src", KINDS)
def test_every_kind_converts_to_every_other(process, src):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * (process.T - process.t_min) * 0.9 + process.t_min + 0.05 * process.T
    col = lambda f: f(t)[:, None]
    alpha, sigma, dalpha, dsigma = col(process.alpha), col(process.sigma), col(process.dalpha), col(process.dsigma)
    x = alpha * x0 + sigma * eps
    out = _kind_value(src, x0, eps, alpha, sigma, dalpha, dsigma)
    model = gf.Model(lambda x_, t_: out, process, prediction=src)
    for dst in KINDS:
        expected = _kind_value(dst, x0, eps, alpha, sigma, dalpha, dsigma)
        torch.testing.assert_close(model.predict(x, t, dst), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.x0(x, t), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.eps(x, t), eps, rtol=1e-9, atol=1e-9)


def test_time_mapping_and_conditioning_reach_the_net():
    seen = {}

    def net(x, t, label=None, scale=1.0):
        seen.update(t=t, label=label, scale=scale)
        return x * scale

    x = torch.zeros(3, 2)
    gf.Model(net, gf.LinearPath(), "velocity", time="reversed", label=7).raw(x, 0.25, scale=2.0)
    assert torch.allclose(seen["t"], torch.full((3,), 0.75)) and seen["t"].dtype == torch.float32
    assert seen["label"] == 7 and seen["scale"] == 2.0
    gf.Model(net, gf.VP(), "eps", time=lambda t: t * 1000).raw(x.double(), torch.tensor([0.1, 0.2, 0.3]))
    assert seen["t"].dtype == torch.float64
    torch.testing.assert_close(seen["t"], torch.tensor([100.0, 200.0, 300.0], dtype=torch.float64))


def test_classifier_free_guidance_combines_conditional_and_unconditional():
    net = lambda x, t, y: torch.full_like(x, float(y))
    model = gf.Model(net, gf.VP(), "eps")
    x = torch.zeros(2, 4)
    guided = gf.guided(model, cond={"y": 3.0}, uncond={"y": 1.0}, scale=2.5)
    torch.testing.assert_close(guided.eps(x, 0.5), torch.full_like(x, 1.0 + 2.5 * (3.0 - 1.0)))
    assert torch.equal(gf.guided(model, cond={"y": 3.0}, uncond={"y": 1.0}, scale=1.0).eps(x, 0.5), torch.full_like(x, 3.0))


def test_bad_models_raise_with_the_argument_named():
    with pytest.raises(ValueError, match="prediction"):
        gf.Model(lambda x, t: x, gf.VP(), "noise")
    with pytest.raises(TypeError, match="net"):
        gf.Model(3, gf.VP())
    with pytest.raises(ValueError, match="time"):
        gf.Model(lambda x, t: x, gf.VP(), time="backwards")
    with pytest.raises(ValueError, match="net must return"):
        gf.Model(lambda x, t: x[:1], gf.VP()).eps(torch.zeros(3, 2), 0.5)
    with pytest.raises(ValueError, match="t must be"):
        gf.Model(lambda x, t: x, gf.VP()).eps(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(TypeError, match="model"):
        gf.guided(lambda x, t: x, scale=2.0)
