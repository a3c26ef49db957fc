"""Reference path of the Hutchinson ops (genflow/ops/hutchinson.py): probes and probe_dot."""
import pytest
import torch

import genflow as gf
from genflow.ops.hutchinson import BLOCK, probe_dot, probes

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rademacher_is_sign_of_the_normal_stream(dtype):
    p = probes((3, 7, 5), seed=11, offset=2, dtype=dtype, backend="torch")
    z = gf.ops.randn((3, 7, 5), seed=11, offset=2, backend="torch")
    assert p.dtype == dtype and p.shape == (3, 7, 5)
    assert set(p.float().unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(p.float(), torch.where(z >= 0, 1.0, -1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_probes_are_randn(dtype):
    p = probes((4, 9), seed=5, offset=1, kind="gaussian", dtype=dtype, backend="torch")
    assert torch.equal(p, gf.ops.randn((4, 9), seed=5, offset=1, dtype=dtype, backend="torch"))


def test_rademacher_is_balanced_and_offsets_are_independent():
    a = probes((1, 20000), seed=3, backend="torch")
    b = probes((1, 20000), seed=3, offset=1, backend="torch")
    assert abs(float(a.mean())) < 0.03
    assert abs(float((a * b).mean())) < 0.03


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_per_sample_seeds_give_each_sample_its_own_stream(kind):
    seeds = [7, 123, 2**40 + 5]
    p = probes((3, 4, 6), seed=seeds, offset=3, kind=kind, backend="torch")
    for b, s in enumerate(seeds):
        assert torch.equal(p[b:b + 1], probes((1, 4, 6), seed=s, offset=3, kind=kind, backend="torch"))
    assert torch.equal(p, probes((3, 4, 6), seed=torch.tensor(seeds), offset=3, kind=kind, backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [5, BLOCK, 3 * BLOCK + 17])
def test_probe_dot_matches_float64_einsum(dtype, numel):
    g = torch.Generator().manual_seed(numel)
    p = torch.randn(3, numel, generator=g).to(dtype)
    v = torch.randn(3, numel, generator=g).to(dtype)
    want = torch.einsum("bi,bi->b", p.double(), v.double())
    got = probe_dot(p, v, backend="torch")
    assert got.dtype == torch.float64 and got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_probe_dot_scale_accumulate_and_out():
    g = torch.Generator().manual_seed(0)
    p, v = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    dot = torch.einsum("bij,bij->b", p.double(), v.double())
    acc = torch.arange(4, dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, -2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(probe_dot(p, v, scale=0.25, backend="torch"), 0.25 * dot, rtol=1e-14, atol=0)
    torch.testing.assert_close(probe_dot(p, v, scale=scale, accumulate=acc, backend="torch"), acc + scale * dot,
                               rtol=1e-14, atol=1e-15)
    out = acc.clone()
    r = probe_dot(p, v, accumulate=out, out=out, backend="torch")
    assert r is out
    torch.testing.assert_close(out, acc + dot, rtol=1e-14, atol=1e-15)


def test_argument_errors():
    p = torch.ones(2, 3)
    with pytest.raises(ValueError, match="kind"):
        probes((2, 3), seed=0, kind="uniform")
    with pytest.raises(ValueError, match="shape"):
        probes((2, -1), seed=0)
    with pytest.raises(TypeError, match="dtype"):
        probes((2, 3), seed=0, dtype=torch.int32)
    with pytest.raises(ValueError, match="seed"):
        probes((2, 3), seed=[1, 2, 3])
    with pytest.raises(ValueError, match="v must have probe's shape"):
        probe_dot(p, torch.ones(2, 4))
    with pytest.raises(TypeError, match="v must have probe's dtype"):
        probe_dot(p, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="scale"):
        probe_dot(p, p, scale=torch.ones(2))
    with pytest.raises(ValueError, match="scale"):
        probe_dot(p, p, scale=torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="accumulate"):
        probe_dot(p, p, accumulate=torch.ones(2))
    with pytest.raises(ValueError, match="out"):
        probe_dot(p, p, out=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend"):
        probe_dot(p, p, backend="tpu")
