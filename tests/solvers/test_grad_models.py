"""Every registered solver runs a network whose parameters require grad (grad mode on, as in a
training loop that samples), gives the sample it gives under ``torch.no_grad()``, and lets the
gradient reach the parameters: the fused in-place (``out=``) paths must not reject or drop it."""
import pytest
import torch

import genflow as gf
from genflow.solvers import SOLVERS


class _TimeMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(0.1 * torch.randn(3, 2, generator=generator, dtype=torch.float64))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]).reshape(-1, 1)
        return torch.tanh(torch.cat([x, t], dim=1) @ self.weight)


FIXED_GRID = [name for name in SOLVERS if name not in ("rk45", "sde_adaptive")]


@pytest.mark.parametrize("solver", FIXED_GRID)
def test_a_model_with_trainable_parameters_samples_and_backpropagates(solver):
    model = gf.Model(_TimeMLP(), gf.VP(), prediction="eps")
    options = dict(solver=solver, steps=4, generator=[3, 4, 5])
    with torch.no_grad():
        expected = gf.sample(model, (3, 2), dtype=torch.float64, **options)
    sample = gf.sample(model, (3, 2), dtype=torch.float64, **options)
    torch.testing.assert_close(sample.detach(), expected, rtol=1e-12, atol=1e-12)
    if sample.requires_grad:
        sample.square().sum().backward()
        assert torch.isfinite(model.net.weight.grad).all() and model.net.weight.grad.abs().sum() > 0
