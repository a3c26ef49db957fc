"""Batch invariance of every default (issue 16, item 3): with per-sample seeds, sample ``i``
solved alone equals sample ``i`` solved in a batch of 16, for every registered solver with its
default options (and ``pc`` with Song et al.'s batch-norm step size does not: that is why it is
an explicit option, ``norm="batch"``)."""
import pytest
import torch

import genflow as gf
from genflow.solvers import SOLVERS

BATCH = 16
MIXTURE = gf.GaussianMixture.ring()
PROCESSES = {"VP": gf.VP(), "VE": gf.VE()}


def _x_T(process):
    g = torch.Generator().manual_seed(4)
    return process.sigma(process.T) * torch.randn(BATCH, 2, generator=g, dtype=torch.float64)


def _batch_and_singles(name, process, **options):
    model = MIXTURE.model(process)
    x_T = _x_T(process)
    seeds = [1000 + i for i in range(BATCH)]
    batch = gf.sample(model, x_T=x_T, solver=name, steps=7, generator=seeds, **options)
    singles = [gf.sample(model, x_T=x_T[i:i + 1], solver=name, steps=7, generator=[seeds[i]], **options)
               for i in (0, 5, BATCH - 1)]
    return batch, singles


# The sharp case is sde_adaptive on VE: accept/reject on the Brownian path amplifies a 1-ulp
# difference in a step size to 1e-1. torch's CPU pow rounds a whole SIMD vector (SLEEF) and the
# remainder (std::pow) differently, hence the controllers' genflow.engine.adaptive.power.
_CASES = [(n, p) for n in SOLVERS for p in PROCESSES]


@pytest.mark.parametrize("name, process", _CASES)
def test_sample_alone_equals_sample_in_batch(name, process):
    batch, singles = _batch_and_singles(name, PROCESSES[process])
    for i, single in zip((0, 5, BATCH - 1), singles):
        torch.testing.assert_close(single[0], batch[i], rtol=1e-12, atol=1e-12, msg=f"{name} sample {i}")


def test_step_size_power_is_batch_invariant():
    """The step-size factor's power gives each value the same bits alone and in any batch."""
    from genflow.engine.adaptive import power

    err = torch.rand(4099, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    together = power(err, -0.9)
    alone = torch.cat([power(err[i:i + 1], -0.9) for i in range(err.shape[0])])
    assert torch.equal(together, alone)
    torch.testing.assert_close(together, err ** -0.9, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("noise", ["seed", "supplied", "none"])
def test_fused_update_rows_are_batch_invariant(dtype, noise):
    """A row of the fused update (per-sample coefficients, per-sample seeds or supplied noise) has
    the same bits alone and in a batch of 16, for row sizes that end inside and outside a vector."""
    from genflow.ops.fused_update import fused_update

    g = torch.Generator().manual_seed(0)
    for size in (1, 2, 3, 7, 65, 2049):
        x, t1, t2, z = (torch.randn(BATCH, size, dtype=dtype, generator=g) for _ in range(4))
        c0, c1, c2, s = (torch.rand(BATCH, dtype=torch.float64, generator=g) for _ in range(4))
        seeds = torch.arange(100, 100 + BATCH)

        def update(rows):
            extra = {"seed": {"seed": seeds[rows], "offset": 3}, "supplied": {"noise": z[rows]}, "none": {}}[noise]
            return fused_update(x[rows], [t1[rows], t2[rows]], [c0[rows], c1[rows], c2[rows]],
                                s[rows] if noise != "none" else 0.0, **extra)

        together = update(slice(None))
        for i in (0, 5, BATCH - 1):
            assert torch.equal(update(slice(i, i + 1))[0], together[i]), (size, i)


def test_pc_batch_norm_is_batch_dependent():
    """The explicit ``norm="batch"`` option (Song et al.'s code) couples the samples of a batch."""
    batch, singles = _batch_and_singles("pc", PROCESSES["VE"], norm="batch")
    assert (singles[0][0] - batch[0]).abs().max() > 1e-3
