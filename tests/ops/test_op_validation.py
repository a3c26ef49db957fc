"""Bad input to the Hutchinson, kernel-mean and Langevin ops (issue 8), through the Python API and
the raw ``torch.ops.genflow`` registrations: dtypes, devices, ranks, empty batches and zero-size
dimensions, non-contiguous and overlapping memory, requires_grad, non-finite scalars and
misspelled names. Each error names the argument and the expected and received value."""
import math

import pytest
import torch
import torch.distributed as dist

import genflow.distributed as D
from genflow._extension import HAS_EXTENSION, has_cuda_kernels
from genflow.ops import kernel_weighted_mean, langevin_update, probe_dot, probes

G = torch.ops.genflow if HAS_EXTENSION else None
pytestmark = pytest.mark.skipif(not (HAS_EXTENSION and hasattr(G, "probe_dot") and hasattr(G, "langevin_update")
                                     and hasattr(G, "kernel_weighted_mean")),
                                reason="genflow._C is not built with the Hutchinson, Langevin and kernel-mean ops")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_EXTENSION and has_cuda_kernels()),
                                reason="needs the CUDA kernels and a GPU")

X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
S1 = torch.tensor([0.5], dtype=torch.float64)
SEED = torch.tensor([7])
C3 = torch.tensor([-1.0, 0.5, 0.1], dtype=torch.float64)  # Langevin (a, b, r)


def _km(*args):
    return G.kernel_weighted_mean(*args)


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_dtype_rejected(dtype):
    bad = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(TypeError, match=f"probe must be float32, float64, bfloat16 or float16, got {dtype}"):
        probe_dot(bad, bad)
    with pytest.raises(RuntimeError, match="probe must be float32, float64, bfloat16 or float16, got"):
        G.probe_dot(bad, bad, S1, None)
    with pytest.raises(TypeError, match=f"x must be float32, float64, bfloat16 or float16, got {dtype}"):
        langevin_update(bad, bad, snr=0.1, seed=1)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16, got"):
        G.langevin_update(bad, bad, C3, None, SEED, 0, False)
    with pytest.raises(TypeError, match=f"queries must be float32 or float64, got {dtype}"):
        kernel_weighted_mean(bad, bad, sigma=1.0)
    with pytest.raises(RuntimeError, match="queries must be float32 or float64, got"):
        _km(bad, bad, bad, None, 1.0, 0)
    with pytest.raises(TypeError, match=f"dtype must be float32, float64, bfloat16 or float16, got {dtype}"):
        probes((4, 3), seed=1, dtype=dtype)
    with pytest.raises(RuntimeError, match="dtype must be float32, float64, bfloat16 or float16, got"):
        G.hutchinson_probes(SEED, 0, [4, 3], dtype, 0)


def test_float16_where_unsupported_and_mixed_dtypes():
    with pytest.raises(TypeError, match="queries must be float32 or float64, got torch.float16"):
        kernel_weighted_mean(X.half(), X.half(), sigma=1.0)
    with pytest.raises(RuntimeError, match="queries must be float32 or float64, got Half"):
        _km(X.half(), X.half(), X.half(), None, 1.0, 0)
    with pytest.raises(TypeError, match="keys must have queries' dtype torch.float32, got torch.float64"):
        kernel_weighted_mean(X, X.double(), sigma=1.0)
    with pytest.raises(RuntimeError, match="log_weights must be Float, got Long"):
        _km(X, X, X, torch.zeros(4, dtype=torch.long), 1.0, 0)
    with pytest.raises(TypeError, match="v must have probe's dtype torch.float32, got torch.bfloat16"):
        probe_dot(X, X.bfloat16())
    with pytest.raises(RuntimeError, match="v must have probe's dtype Float, got BFloat16"):
        G.probe_dot(X, X.bfloat16(), S1, None)
    with pytest.raises(TypeError, match="model_out must have x's dtype torch.float32, got torch.float16"):
        langevin_update(X, X.half(), snr=0.1, seed=1)
    with pytest.raises(RuntimeError, match="model_out must have x's dtype Float, got Half"):
        G.langevin_update(X, X.half(), C3, None, SEED, 0, False)


def test_integer_side_arguments():
    """Seeds must be int64, coefficient and scale tensors float64 (raw ops); the wrappers convert."""
    with pytest.raises(RuntimeError, match="seed must be Long, got Int"):
        G.hutchinson_probes(SEED.int(), 0, [4, 3], torch.float32, 0)
    with pytest.raises(RuntimeError, match="seed must be Long, got Int"):
        G.langevin_update(X, X, C3, None, SEED.int(), 0, False)
    with pytest.raises(RuntimeError, match="coef must be Double, got Long"):
        G.langevin_update(X, X, C3.long(), None, SEED, 0, False)
    with pytest.raises(RuntimeError, match="scale must be Double, got Int"):
        G.probe_dot(X, X, S1.int(), None)
    with pytest.raises(TypeError, match="seed tensor must be int64, got torch.int32"):
        probes((4, 3), seed=torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    with pytest.raises(TypeError, match="scale must be a float or a float64 tensor, got dtype torch.int64"):
        probe_dot(X, X, scale=torch.ones(4, dtype=torch.long))


# ---------------------------------------------------------------- devices

def test_mixed_devices_python_api():
    meta = X.to("meta")
    with pytest.raises(ValueError, match="v must be on probe's device cpu, got meta"):
        probe_dot(X, meta)
    with pytest.raises(ValueError, match="noise must be on x's device cpu, got meta"):
        langevin_update(X, X, snr=0.1, noise=meta)
    with pytest.raises(ValueError, match="values must be on queries' device cpu, got meta"):
        kernel_weighted_mean(X, X, meta, sigma=1.0)


def test_mixed_devices_raw_ops_with_meta():
    """Mixing meta and CPU tensors dispatches to the fake (meta) kernels, which check devices like
    the C++ ops (they once returned uninitialised CPU memory)."""
    meta = X.to("meta")
    with pytest.raises(RuntimeError, match="v must be on probe's device cpu, got meta"):
        G.probe_dot(X, meta, S1, None)
    with pytest.raises(RuntimeError, match="log_weights must be on queries' device cpu, got meta"):
        _km(X, X, X, torch.zeros(4, device="meta"), 1.0, 0)
    with pytest.raises(RuntimeError, match="noise must be on x's device cpu, got meta"):
        G.langevin_update(X, X, C3, meta, None, 0, False)
    with pytest.raises(RuntimeError, match="out must be on x's device cpu, got meta"):
        G.langevin_update_out(X, X, C3, None, SEED, 0, False, meta)
    # a CPU coef / seed / scale with meta inputs is allowed (as on CUDA)
    assert G.langevin_update(meta, meta, C3, None, SEED, 0, False).device.type == "meta"
    assert G.probe_dot(meta, meta, S1, None).device.type == "meta"


@needs_cuda
def test_mixed_devices_raw_ops_cuda():
    xc = X.cuda()
    with pytest.raises(RuntimeError, match=r"v must be on probe's device cuda:0, got cpu"):
        G.probe_dot(xc, X, S1, None)
    with pytest.raises(RuntimeError, match=r"accumulate must be on cuda:0, got cpu"):
        G.probe_dot(xc, xc, S1, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"keys must be on cuda:0, got cpu"):
        _km(xc, X, xc, None, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"noise must be on x's device cuda:0, got cpu"):
        G.langevin_update(xc, xc, C3, X, None, 0, False)
    with pytest.raises(RuntimeError, match=r"out must be on x's device cuda:0, got cpu"):
        G.langevin_update_out(xc, xc, C3, None, SEED, 0, False, X.clone())


# ---------------------------------------------------------------- ranks and shapes

def test_wrong_ranks():
    zero_dim = torch.tensor(1.0)
    with pytest.raises(ValueError, match="probe must have a batch dimension, got a 0-dim tensor"):
        probe_dot(zero_dim, zero_dim)
    with pytest.raises(RuntimeError, match=r"probe must have a batch dimension \[B, \*D\], got a 0-dim tensor"):
        G.probe_dot(zero_dim, zero_dim, S1, None)
    with pytest.raises(ValueError, match=r"queries must have shape \[N, d\], got \[12\]"):
        kernel_weighted_mean(X.reshape(-1), X, sigma=1.0)
    with pytest.raises(RuntimeError, match=r"queries must have shape \[N, d\], got \[4, 3, 1\]"):
        _km(X[..., None], X, X, None, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"seed must have shape \[1\] \(one stream\) or \[B\] = \[4\].*got \[1, 1\]"):
        G.hutchinson_probes(SEED[None], 0, [4, 3], torch.float32, 0)
    with pytest.raises(RuntimeError, match=r"coef must have shape \[3\] or \[3, B\] = \[3, 4\].*got \[1, 3\]"):
        G.langevin_update(X, X, C3[None], None, SEED, 0, False)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[1\] or \[B\] = \[4\], got \[1, 1\]"):
        G.probe_dot(X, X, S1[None], None)
    with pytest.raises(ValueError, match=r"out must have shape \[B\] = \[4\], got \[4, 1\]"):
        probe_dot(X, X, out=torch.zeros(4, 1, dtype=torch.float64))


# ---------------------------------------------------------------- empty batches and zero-size dimensions

def test_empty_batch_returns_empty():
    e = torch.empty(0, 3)
    e64 = torch.empty(0, dtype=torch.float64)
    assert probes((0, 3), seed=[]).shape == (0, 3)
    assert G.hutchinson_probes(torch.empty(0, dtype=torch.long), 0, [0, 3], torch.float32, 1).shape == (0, 3)
    assert probe_dot(e, e, scale=torch.ones(0, dtype=torch.float64), accumulate=e64).shape == (0,)
    assert G.probe_dot(e, e, torch.ones(0, dtype=torch.float64), e64).shape == (0,)
    assert langevin_update(e, e, snr=0.1, seed=[]).shape == (0, 3)
    # seed [B] = [0]: an empty per-sample seed tensor (this read past its end once)
    assert G.langevin_update(e, e, C3, None, torch.empty(0, dtype=torch.long), 0, False).shape == (0, 3)
    assert G.langevin_update(e, e, torch.zeros(3, 0, dtype=torch.float64), e, None, 0, True).shape == (0, 3)
    out, lse = kernel_weighted_mean(e, X, sigma=1.0, return_lse=True)
    assert out.shape == (0, 3) and lse.shape == (0,)
    q = e.clone().requires_grad_(True)
    k = X.clone().requires_grad_(True)
    kernel_weighted_mean(q, k, sigma=1.0).sum().backward()
    assert q.grad.shape == (0, 3) and torch.equal(k.grad, torch.zeros_like(X))


def test_zero_size_feature_dims():
    z = torch.empty(4, 0)
    acc = torch.arange(4, dtype=torch.float64)
    assert probes((4, 0), seed=1).shape == (4, 0)
    assert torch.equal(probe_dot(z, z, accumulate=acc), acc)  # an empty sum is 0
    assert torch.equal(G.probe_dot(z, z, S1, None), torch.zeros(4, dtype=torch.float64))
    assert langevin_update(z, z, snr=0.1, seed=1).shape == (4, 0)
    # d = 0: every distance is 0, so out is the (log-weighted) mean of the values
    v = torch.randn(5, 2, dtype=torch.float64)
    out = kernel_weighted_mean(torch.empty(3, 0, dtype=torch.float64), torch.empty(5, 0, dtype=torch.float64), v,
                               sigma=1.0)
    torch.testing.assert_close(out, v.mean(0).expand(3, 2))
    assert _km(X, X, torch.empty(4, 0), None, 1.0, 0)[0].shape == (4, 0)
    with pytest.raises(ValueError, match=r"keys must have at least one row \(M >= 1\), got shape \[0, 3\]"):
        kernel_weighted_mean(X, X[:0], sigma=1.0)
    with pytest.raises(RuntimeError, match=r"keys must have at least one row \(M >= 1\), got \[0, 3\]"):
        _km(X, X[:0], X[:0], None, 1.0, 0)


# ---------------------------------------------------------------- non-contiguous and overlapping memory

def test_non_contiguous_and_expanded_inputs_match_contiguous():
    gen = torch.Generator().manual_seed(1)
    t, t2 = (torch.randn(10, 7, generator=gen).t() for _ in range(2))  # [7, 10], transposed
    c, c2 = t.contiguous(), t2.contiguous()
    wide = torch.randn(7, 20, generator=gen)[:, ::2]  # [7, 10], a strided slice
    row = torch.randn(1, 10, generator=gen).expand(7, 10)  # stride 0: read-only inputs may alias
    assert torch.equal(probe_dot(t, t2), probe_dot(c, c2))
    assert torch.equal(G.probe_dot(row, wide, S1, None), G.probe_dot(row.contiguous(), wide.contiguous(), S1, None))
    assert torch.equal(langevin_update(t, t2, snr=0.2, seed=3), langevin_update(c, c2, snr=0.2, seed=3))
    assert torch.equal(G.langevin_update(wide, row, C3, None, SEED, 0, False),
                       G.langevin_update(wide.contiguous(), row.contiguous(), C3, None, SEED, 0, False))
    assert torch.equal(kernel_weighted_mean(t, t2, wide, sigma=2.0),
                       kernel_weighted_mean(c, c2, wide.contiguous(), sigma=2.0))
    seeds = torch.arange(20)[::2]
    assert torch.equal(G.hutchinson_probes(seeds, 0, [10, 3], torch.float32, 0),
                       G.hutchinson_probes(seeds.contiguous(), 0, [10, 3], torch.float32, 0))
    assert torch.equal(probes((10, 3), seed=seeds), probes((10, 3), seed=seeds.contiguous()))


def test_overlapping_outputs_rejected():
    expanded = torch.zeros(1, 3).expand(4, 3)
    with pytest.raises(ValueError, match=r"out must not have overlapping memory \(an expand\(\)ed tensor\), "
                                         r"got strides \(0, 1\) for shape \[4, 3\]"):
        langevin_update(X, X, snr=0.1, seed=1, out=expanded)
    with pytest.raises(ValueError, match="out must not have overlapping memory"):
        langevin_update(X, X, snr=0.1, seed=1, out=expanded, backend="torch")
    with pytest.raises(RuntimeError, match=r"out must not have overlapping memory .*got shape \[4, 3\] "
                                           r"with strides \[0, 1\]"):
        G.langevin_update_out(X, X, C3, None, SEED, 0, False, expanded)
    buf = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="out must be x itself or not overlap it in memory, got a partial overlap"):
        G.langevin_update_out(buf[:4], X, C3, None, SEED, 0, False, buf[1:])
    with pytest.raises(RuntimeError, match="out must be noise itself or not overlap it in memory"):
        G.langevin_update_out(X, X, C3, buf[:4], None, 0, False, buf[1:])
    with pytest.raises(ValueError, match=r"out must not have overlapping memory .*got stride \(0,\) for shape \[4\]"):
        probe_dot(X, X, out=torch.zeros(1, dtype=torch.float64).expand(4))
    # exact aliases are fine: out = accumulate, out = x
    acc = torch.ones(4, dtype=torch.float64)
    expect = probe_dot(X, X, accumulate=acc)
    assert probe_dot(X, X, accumulate=acc, out=acc) is acc and torch.equal(acc, expect)
    x = X.clone()
    expect = langevin_update(x, X, snr=0.1, seed=1)
    assert torch.equal(langevin_update(x, X, snr=0.1, seed=1, out=x), expect)


# ---------------------------------------------------------------- requires_grad

def test_requires_grad_where_not_differentiable():
    xg = X.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"probe must not require grad: probe_dot is not differentiable "
                                         r"\(pass probe.detach\(\)"):
        probe_dot(xg, X)
    with pytest.raises(RuntimeError, match=r"genflow::probe_dot is not differentiable: v must not require grad, "
                                           r"got requires_grad=True"):
        G.probe_dot(X, xg, S1, None)
    with pytest.raises(ValueError, match="x must not require grad with out= .out= is not differentiable"):
        langevin_update(xg, X, snr=0.1, seed=1, out=torch.empty(4, 3))
    with pytest.raises(ValueError, match="snr must not require grad with out="):
        langevin_update(X, X, snr=torch.full((4,), 0.1, requires_grad=True), seed=1, out=torch.empty(4, 3))
    with pytest.raises(RuntimeError, match="genflow::langevin_update_out is not differentiable: model_out must not"):
        G.langevin_update_out(X, xg, C3, None, SEED, 0, False, torch.empty(4, 3))
    lw = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="log_weights must not require grad"):
        kernel_weighted_mean(X, X, sigma=1.0, log_weights=lw)
    with pytest.raises(ValueError, match="log_weights must not require grad"):
        _km(X, X, X, lw, 1.0, 0)
    # allowed without grad mode, and where autograd is supported
    with torch.no_grad():
        assert torch.equal(probe_dot(xg, X), G.probe_dot(X, X, torch.ones(1, dtype=torch.float64), None))
        G.langevin_update_out(X, xg, C3, None, SEED, 0, False, torch.empty(4, 3))
    langevin_update(xg, X, snr=0.1, seed=1).sum().backward()
    assert xg.grad is not None


# ---------------------------------------------------------------- non-finite and non-positive scalars

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scalars(bad):
    with pytest.raises(ValueError, match=f"scale must be finite, got {bad}"):
        probe_dot(X, X, scale=bad)
    with pytest.raises(ValueError, match=f"scale must be finite, got {bad}"):
        probe_dot(X, X, scale=torch.tensor([1.0, bad, 1.0, 1.0], dtype=torch.float64))
    with pytest.raises(RuntimeError, match=f"scale must be finite, got {bad}"):
        G.probe_dot(X, X, torch.tensor([bad], dtype=torch.float64), None)
    with pytest.raises(ValueError, match=f"sigma must be a finite number > 0, got {bad}"):
        kernel_weighted_mean(X, X, sigma=bad)
    with pytest.raises(RuntimeError, match=r"scale = 1 / \(2 sigma\^2\) must be finite and > 0, got"):
        _km(X, X, X, None, bad, 0)
    with pytest.raises(ValueError, match=f"snr must be a finite number >= 0, got {bad}"):
        langevin_update(X, X, snr=bad, seed=1)
    with pytest.raises(ValueError, match=f"coefs\\[0\\] must be a finite number, got {bad}"):
        langevin_update(X, X, (bad, 1.0), snr=0.1, seed=1)
    with pytest.raises(ValueError, match=f"alpha_i must be a finite number >= 0, got {bad}"):
        langevin_update(X, X, snr=0.1, alpha_i=torch.tensor([1.0, 1.0, bad, 1.0]), seed=1, backend="torch")
    coef = torch.tensor([[0.0] * 4, [1.0, 1.0, bad, 1.0], [0.1] * 4], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f"coef\\[1\\] \\(b\\) must be finite, got {bad}"):
        G.langevin_update(X, X, coef, None, SEED, 0, False)


def test_non_positive_scalars():
    for sigma in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"sigma must be a finite number > 0, got {sigma}"):
            kernel_weighted_mean(X, X, sigma=sigma)
    with pytest.raises(RuntimeError, match=r"scale = 1 / \(2 sigma\^2\) must be finite and > 0, got 0"):
        _km(X, X, X, None, 0.0, 0)
    with pytest.raises(ValueError, match="snr must be a finite number >= 0, got -0.5"):
        langevin_update(X, X, snr=torch.tensor([0.1, -0.5, 0.1, 0.1]), seed=1)
    with pytest.raises(RuntimeError, match=r"coef\[2\] \(r = 2 alpha_i snr\^2\) must be finite and >= 0, got -0.1"):
        G.langevin_update(X, X, torch.tensor([-1.0, 0.5, -0.1], dtype=torch.float64), None, SEED, 0, False)
    # negative probe_dot scales and zero snr are valid
    assert torch.equal(probe_dot(X, X, scale=-1.0), -probe_dot(X, X))
    assert torch.equal(langevin_update(X, X, snr=0.0, seed=1), X)


# ---------------------------------------------------------------- names: "did you mean"

def test_misspelled_names_suggest_the_closest():
    with pytest.raises(ValueError, match=r"kind must be one of \('rademacher', 'gaussian'\), got 'gausian' "
                                         r"\(did you mean 'gaussian'\?\)"):
        probes((4, 3), seed=1, kind="gausian")
    with pytest.raises(ValueError, match=r"norm must be 'sample' or 'batch', got 'batches' \(did you mean 'batch'\?\)"):
        langevin_update(X, X, snr=0.1, seed=1, norm="batches")
    with pytest.raises(ValueError, match=r"precision must be one of .*got 'highst' \(did you mean 'highest'\?\)"):
        kernel_weighted_mean(X, X, sigma=1.0, precision="highst")
    with pytest.raises(ValueError, match=r"norm must be 'sample' or 'batch', got 'xyz'$"):
        langevin_update(X, X, snr=0.1, seed=1, norm="xyz")
    # the raw ops take integer codes
    with pytest.raises(RuntimeError, match=r"kind must be 0 \(rademacher\) or 1 \(gaussian\), got 2"):
        G.hutchinson_probes(SEED, 0, [4, 3], torch.float32, 2)
    with pytest.raises(RuntimeError, match=r"precision must be 0 \(highest\), 1 \(tf32\) or 2 \(bf16\), got -1"):
        _km(X, X, X, None, 1.0, -1)


# ---------------------------------------------------------------- sharded kernel mean: an empty shard

@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_empty_shard_checked_like_a_full_one(tmp_path):
    """A rank whose key shard is empty validates its arguments as the others do (a rank that
    skipped a check would enter the collective while the others raise)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        empty = X[:0]
        with pytest.raises(ValueError, match="sigma must be a finite number > 0, got 0.0"):
            D.kernel_weighted_mean(X, empty, sigma=0.0)
        with pytest.raises(TypeError, match="keys must have queries' dtype torch.float32, got torch.float64"):
            D.kernel_weighted_mean(X, empty.double(), sigma=1.0)
        with pytest.raises(ValueError, match=r"got 'tf23' \(did you mean 'tf32'\?\)"):
            D.kernel_weighted_mean(X, empty, sigma=1.0, precision="tf23")
        with pytest.raises(ValueError, match="backend must be one of"):
            D.kernel_weighted_mean(X, empty, sigma=1.0, backend="gpu")
        with pytest.raises(ValueError, match="no rank holds a key"):  # valid, but no keys anywhere
            D.kernel_weighted_mean(X, empty, sigma=1.0)
    finally:
        dist.destroy_process_group()
