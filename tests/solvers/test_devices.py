"""Every registered solver on every available device (cuda skipped without a GPU): float32 on the
device against the float64 CPU solve of the same exact Gaussian-mixture model, the same start
and the same per-sample noise seeds (the Philox stream is the same on every device and dtype)."""
import pytest
import torch

import genflow as gf
from genflow.solvers import SOLVERS

from .references import mixture

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
SEEDS = [11, 12, 13, 14, 15, 16]


def _solve(name, device, dtype):
    process = gf.VP()
    model = mixture().model(process)
    x_T = process.prior_sample((len(SEEDS), 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    options = {"rtol": 1e-4, "atol": 1e-4} if getattr(SOLVERS[name], "adaptive", False) else {}
    return gf.sample(model, x_T=x_T.to(device=device, dtype=dtype), solver=name, steps=12, t_end=1e-3,
                     generator=SEEDS, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_on_device_matches_the_float64_cpu_solve(name, device):
    out = _solve(name, device, torch.float32)
    assert out.device.type == device and out.dtype == torch.float32 and out.shape == (len(SEEDS), 2)
    assert torch.isfinite(out).all()
    if name == "sde_adaptive":  # float32 rounding flips accept/reject decisions on a rough path
        return
    reference = _solve(name, "cpu", torch.float64)
    torch.testing.assert_close(out.cpu().double(), reference, rtol=0.0, atol=2e-4 * float(reference.abs().max()))
