"""Likelihood preconditions (issue 16, item 8): the divergence is taken only of a drift that
depends on ``x`` through autograd; a detached or non-differentiable network gets an error naming
the model, exact and Hutchinson alike, instead of a confident wrong number."""
import numpy as np
import pytest
import torch

import genflow as gf

PROCESS = gf.VP()
EXACT = gf.GaussianMixture.ring().model(PROCESS).net
X = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _detached(x, t):
    return EXACT(x.detach(), t)


def _numpy(x, t):
    return torch.from_numpy(np.tanh(x.detach().numpy()))


def _no_grad(x, t):
    with torch.no_grad():
        return EXACT(x, t)


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
@pytest.mark.parametrize("net", [_detached, _numpy, _no_grad], ids=["detach", "numpy", "no_grad"])
def test_non_differentiable_network_is_refused_naming_the_model(net, method):
    model = gf.Model(net, PROCESS, "x0")
    with pytest.raises(ValueError, match=rf"output of Model\(net=<function {net.__name__}.*does not depend on x "
                                         rf"through autograd.*method='{method}'"):
        gf.log_likelihood(model, X, method=method, generator=0)


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_differentiable_network_is_accepted(method):
    logp = gf.log_likelihood(gf.Model(EXACT, PROCESS, "x0"), X, method=method, generator=0, rtol=1e-4, atol=1e-4)
    assert logp.shape == (5,) and bool(torch.isfinite(logp).all())
