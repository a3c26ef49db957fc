"""genflow.ops.langevin_update: the compiled op against the pure-PyTorch reference (bitwise for
float32/bfloat16/float16 state), the CUDA kernels' reduction order run on the host, the step-size
rule itself, aliasing, thread-count independence, opcheck / torch.compile / gradcheck, errors."""
import math

import pytest
import torch

from genflow._extension import HAS_EXTENSION, has_cuda_kernels
from genflow.ops import _reference as R
from genflow.ops import fused_update, langevin_update, randn

HAS_OP = HAS_EXTENSION and hasattr(torch.ops.genflow, "langevin_update")
needs_op = pytest.mark.skipif(not HAS_OP, reason="genflow._C is not built with langevin_update")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_cuda_kernels() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# The reductions have one order everywhere and float32 products are exact in float64, so only
# float64 state (whose fmas the reference rounds twice) may differ from the reference.
TOL = {
    torch.float32: dict(rtol=0.0, atol=0.0),
    torch.float64: dict(rtol=1e-13, atol=1e-13),
    torch.bfloat16: dict(rtol=0.0, atol=0.0),
    torch.float16: dict(rtol=0.0, atol=0.0),
}
NOISE_KINDS = ["supplied", "seed", "per_sample_seed"]


def _make(shape, dtype, device, layout, gen):
    """A fresh tensor of ``shape`` in the given memory layout (contiguous, transposed, sliced)."""
    if layout == "contiguous":
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if layout == "transposed":
        base = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return base.transpose(0, -1) if len(shape) > 1 else base
    wide = shape[:-1] + (2 * shape[-1] + 1,)
    base = torch.randn(wide, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return base[..., 1::2]


def _case(per_sample, noise_kind, shape, dtype, device, layout="contiguous", seed=0):
    """x, model_out, the wrapper's keyword arguments (coefs, snr, alpha_i, noise/seed)."""
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, device, layout, gen)
    out = _make(shape, dtype, device, layout, gen)
    B = shape[0] if shape else 1

    def coef(v):
        if per_sample:
            return (v * (1 + 0.3 * torch.rand(B, generator=gen, dtype=torch.float64))).to(device)
        return v

    kwargs = dict(coefs=(coef(-0.8), coef(1.3)), snr=coef(0.16), alpha_i=coef(0.98))
    if noise_kind == "supplied":
        kwargs["noise"] = _make(shape, dtype, device, layout, gen)
    elif noise_kind == "seed":
        kwargs.update(seed=1234, offset=5)
    else:
        kwargs.update(seed=[1000 + b for b in range(B)], offset=2)
    return x, out, kwargs


def _assert_close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])


def _packed(kwargs, B):
    """The op's (coef, noise, seed, offset) for the wrapper's keyword arguments."""
    def vec(v):
        return v if isinstance(v, torch.Tensor) else torch.full((B,), float(v), dtype=torch.float64)
    a, b = (vec(c).cpu() for c in kwargs["coefs"])
    snr = vec(kwargs["snr"]).cpu()
    coef = torch.stack([a, b, 2.0 * vec(kwargs["alpha_i"]).cpu() * snr * snr])  # the wrapper's rounding
    seed = kwargs.get("seed")
    if seed is not None:
        seed = torch.tensor(seed if isinstance(seed, list) else [seed])
    return coef, kwargs.get("noise"), seed, kwargs.get("offset", 0)


# ---------------------------------------------------------------- kernel == reference

@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("noise_kind", NOISE_KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("norm", ["sample", "batch"])
def test_matches_reference(device, dtype, per_sample, noise_kind, layout, norm):
    x, out, kwargs = _case(per_sample, noise_kind, (6, 37), dtype, device, layout)
    got = langevin_update(x, out, norm=norm, **kwargs)
    ref = langevin_update(x, out, norm=norm, backend="torch", **kwargs)
    _assert_close(got, ref, dtype)
    assert got.is_contiguous()


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (1, 1023), (3, 1, 7), (2, 4097), (5, 13107), (1, 65537)])
@pytest.mark.parametrize("noise_kind", NOISE_KINDS)
def test_odd_sizes(device, dtype, shape, noise_kind):
    x, out, kwargs = _case(len(shape) > 1, noise_kind, shape, dtype, device, seed=1)
    for norm in ("sample", "batch"):
        _assert_close(langevin_update(x, out, norm=norm, **kwargs),
                      langevin_update(x, out, norm=norm, backend="torch", **kwargs), dtype)


@needs_op
def test_more_than_1024_chunks_per_sample():
    """A sample of more than 1024 chunks uses the second level of the lane reduction."""
    x, out, kwargs = _case(False, "seed", (1, 4096 * 1025 + 3), torch.float32, "cpu", seed=2)
    _assert_close(langevin_update(x, out, **kwargs), langevin_update(x, out, backend="torch", **kwargs), torch.float32)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 1027), (2, 4096 * 2 + 5), (1300, 3)])
@pytest.mark.parametrize("noise_kind", NOISE_KINDS)
@pytest.mark.parametrize("norm", ["sample", "batch"])
def test_cuda_reduction_order_on_host(dtype, shape, noise_kind, norm):
    """The CUDA kernels' per-thread work (lanes 4l..4l+3, one Philox call per group of four,
    crossing samples with one seed) and block trees, run serially on the host, equal the CPU
    kernel bitwise, float64 included: CPU and GPU results are the same bits."""
    x, out, kwargs = _case(True, noise_kind, shape, dtype, "cpu", seed=4)
    expect = langevin_update(x, out, norm=norm, **kwargs)
    coef, noise, seed, offset = _packed(kwargs, shape[0])
    got = torch.ops.genflow._langevin_update_grouped(x, out, coef, noise, seed, offset, norm == "batch")
    assert torch.equal(got, expect)


# ---------------------------------------------------------------- the step itself

@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("norm", ["sample", "batch"])
def test_is_song_et_al_step(backend, norm):
    """x + eps s + sqrt(2 eps) z with eps = 2 alpha_i (snr ||z|| / ||s||)^2, computed plainly."""
    gen = torch.Generator().manual_seed(7)
    x, out, z = (torch.randn(4, 3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    a, b = torch.tensor([-0.5, -1.0, -2.0, 0.3], dtype=torch.float64), 1.5
    snr, alpha_i = 0.2, torch.tensor([1.0, 0.9, 0.8, 0.7], dtype=torch.float64)
    s = a[:, None, None] * x + b * out
    s_norm, z_norm = s.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1)
    if norm == "batch":
        s_norm, z_norm = s_norm.mean().expand(4), z_norm.mean().expand(4)
    eps = (2 * alpha_i * (snr * z_norm / s_norm) ** 2)[:, None, None]
    expect = x + eps * s + torch.sqrt(2 * eps) * z
    got = langevin_update(x, out, (a, b), snr=snr, alpha_i=alpha_i, norm=norm, noise=z, backend=backend)
    torch.testing.assert_close(got, expect, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_generated_noise_is_the_randn_stream(backend):
    x, out, _ = _case(True, "seed", (4, 301), torch.float32, "cpu")
    for seed in (77, [5, 6, 7, 8]):
        z = randn(x.shape, seed=seed, offset=3)
        a = langevin_update(x, out, (-1.0, 0.5), snr=0.1, seed=seed, offset=3, backend=backend)
        assert torch.equal(a, langevin_update(x, out, (-1.0, 0.5), snr=0.1, noise=z, backend=backend))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_per_sample_seeds_make_samples_batch_independent(backend):
    x, out, _ = _case(False, "seed", (5, 40), torch.float32, "cpu")
    batch = langevin_update(x, out, (-1.0, 0.5), snr=0.16, seed=[3, 4, 5, 6, 7], offset=1, backend=backend)
    for b in range(5):
        alone = langevin_update(x[b:b + 1], out[b:b + 1], (-1.0, 0.5), snr=0.16, seed=[3 + b], offset=1,
                                backend=backend)
        assert torch.equal(batch[b:b + 1], alone)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_zero_score_sample_is_unchanged(backend):
    """eps = 0 for a sample whose score vanishes (and for all with norm='batch' if all vanish)."""
    x = torch.randn(3, 6, dtype=torch.float64)
    out = x.clone()
    a = torch.tensor([-1.0, -0.5, -1.0], dtype=torch.float64)  # s = a x + x: zero for samples 0, 2
    got = langevin_update(x, out, (a, 1.0), snr=0.16, seed=1, backend=backend)
    assert torch.equal(got[[0, 2]], x[[0, 2]]) and not torch.equal(got[1], x[1])
    same = langevin_update(x, out, (-1.0, 1.0), snr=0.16, seed=1, norm="batch", backend=backend)
    assert torch.equal(same, x)
    assert torch.equal(langevin_update(x, out, (0.5, 0.5), snr=0.0, seed=1, backend=backend), x)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_zero_dim_and_empty(device):
    x = torch.tensor(2.0, device=device)
    o = torch.tensor(-1.0, device=device)
    assert torch.equal(langevin_update(x, o, (0.5, 1.0), snr=0.3, seed=3),
                       langevin_update(x, o, (0.5, 1.0), snr=0.3, seed=3, backend="torch"))
    for shape in [(0, 5), (3, 0)]:
        e = torch.empty(shape, device=device)
        assert langevin_update(e, e, (1.0, 2.0), snr=0.1, seed=1).shape == shape


# ---------------------------------------------------------------- out=, aliasing, threads

@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise_kind", NOISE_KINDS)
def test_out_aliasing_x(device, dtype, noise_kind):
    x, out, kwargs = _case(True, noise_kind, (4, 5000), dtype, device)
    expect = langevin_update(x, out, **kwargs)
    ptr = x.data_ptr()
    got = langevin_update(x, out, out=x, **kwargs)
    assert got is x and x.data_ptr() == ptr
    assert torch.equal(x, expect)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_out_aliasing_model_out_and_noise(device):
    x, out, kwargs = _case(False, "supplied", (3, 999), torch.float32, device)
    expect = langevin_update(x, out, **kwargs)
    langevin_update(x, out, out=out, **kwargs)
    assert torch.equal(out, expect)
    x, out, kwargs = _case(False, "supplied", (3, 999), torch.float32, device)
    langevin_update(x, out, out=kwargs["noise"], **kwargs)
    assert torch.equal(kwargs["noise"], expect)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_out_non_contiguous(device, layout):
    x, out, kwargs = _case(True, "seed", (6, 37), torch.float32, device, layout)
    expect = langevin_update(x, out, **kwargs)
    dest = _make((6, 37), torch.float32, device, layout, torch.Generator().manual_seed(9))
    assert torch.equal(langevin_update(x, out, out=dest, **kwargs), expect)
    langevin_update(x, out, out=x, **kwargs)
    assert torch.equal(x, expect)


@needs_op
def test_partial_overlap_rejected():
    buf = torch.randn(101)
    with pytest.raises(RuntimeError, match="overlap|memory location"):
        langevin_update(buf[:100], torch.ones(100), (1.0, 1.0), snr=0.1, seed=1, out=buf[1:])


@needs_op
@pytest.mark.parametrize("noise_kind", NOISE_KINDS)
@pytest.mark.parametrize("shape", [(3, 200_003), (4000, 5)])
def test_thread_count_independent(noise_kind, shape):
    x, out, kwargs = _case(True, noise_kind, shape, torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results += [langevin_update(x, out, **kwargs), langevin_update(x, out, norm="batch", **kwargs)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[k], results[k + 2]) for k in range(4))


# ---------------------------------------------------------------- opcheck, torch.compile, autograd

def _op_inputs(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, generator=gen).to(device)
    m = torch.randn(4, 9, generator=gen).to(device)
    xd, md = x.double(), m.double()
    c3 = torch.tensor([-0.9, 0.5, 0.05], dtype=torch.float64)
    return [
        (x, m, c3, None, torch.tensor([3]), 2, False),
        (x, m, c3, torch.randn(4, 9, generator=gen).to(device), None, 0, True),
        (xd, md, torch.rand(3, 4, generator=gen, dtype=torch.float64).to(device), None,
         torch.arange(4, device=device), 1, False),
        (x.bfloat16(), m.bfloat16(), c3, None, torch.tensor([5]), 0, True),
        (xd.requires_grad_(), md.requires_grad_(), torch.rand(3, 4, dtype=torch.float64, device=device),
         torch.randn(4, 9, dtype=torch.float64, device=device).requires_grad_(), None, 0, False),
    ]


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(5))
def test_opcheck(device, i):
    args = _op_inputs(device)[i]
    torch.library.opcheck(torch.ops.genflow.langevin_update.default, args)
    if not args[0].requires_grad:
        torch.library.opcheck(torch.ops.genflow.langevin_update_out.default, (*args, torch.empty_like(args[0])))


@needs_op
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def corrector(x, out, a):
        y = langevin_update(x, out, (a, 1.0), snr=0.16, seed=[1, 2, 3], offset=4)
        return langevin_update(y, out, (-1.0, 1.0), snr=0.16, alpha_i=0.9, seed=7, offset=5, norm="batch")

    def inplace(x, out):
        langevin_update(x, out, (-1.0, 1.0), snr=0.2, seed=7, offset=1, out=x)
        return x

    x = torch.randn(3, 10, device=device)
    out = torch.randn(3, 10, device=device)
    a = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, device=device)
    compiled = torch.compile(corrector, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, out, a), corrector(x, out, a))
    xa, xb = x.clone(), x.clone()
    torch.compile(inplace, fullgraph=True, backend="aot_eager")(xa, out)
    inplace(xb, out)
    assert torch.equal(xa, xb)


@needs_op
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("noise_kind", ["supplied", "seed"])
@pytest.mark.parametrize("batch_mean", [False, True])
def test_gradcheck(device, per_sample, noise_kind, batch_mean):
    """The registered backward differentiates through the per-sample (or batch) eps."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    m = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    coef = torch.rand((3, 3) if per_sample else (3,), generator=gen, dtype=torch.float64).to(device).requires_grad_()
    noise = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    op = torch.ops.genflow.langevin_update
    if noise_kind == "supplied":
        assert torch.autograd.gradcheck(lambda x, m, c, n: op(x, m, c, n, None, 0, batch_mean), (x, m, coef, noise))
    else:
        seed = torch.tensor([4])
        assert torch.autograd.gradcheck(lambda x, m, c: op(x, m, c, None, seed, 3, batch_mean), (x, m, coef))


def test_reference_sums_are_the_documented_order():
    """langevin_sums: lanes q + 1024 k in order, then the adjacent-pairs tree (spot check
    against a direct float64 sum, and exactness on integers)."""
    v = torch.randn(2, 9000, dtype=torch.float64)
    torch.testing.assert_close(R.langevin_sums(v), (v * v).sum(1), rtol=1e-14, atol=0)
    ints = torch.arange(3000, dtype=torch.float32).reshape(1, -1)
    assert R.langevin_sums(ints).item() == sum(float(i) ** 2 for i in range(3000))
    assert R.lane_sum(torch.ones(2, 5000, dtype=torch.float64)).tolist() == [5000.0, 5000.0]
    assert math.isclose(R.lane_sum(torch.tensor([[1.0, 2.0, 3.0]])).item(), 6.0)


# ---------------------------------------------------------------- backends and errors

def test_reference_backend_always_available():
    x, out = torch.randn(2, 3), torch.randn(2, 3)
    z = torch.randn(2, 3)
    got = langevin_update(x, out, (0.0, 1.0), snr=0.1, noise=z, backend="torch")
    eps = 2 * (0.1 * z.norm(dim=1) / out.norm(dim=1)) ** 2
    torch.testing.assert_close(got, x + eps[:, None] * out + (2 * eps[:, None]).sqrt() * z)
    # = the fused update with eps from the documented float64 sums
    eps64 = (2 * 0.1 * 0.1) * R.langevin_sums(z) / R.langevin_sums(out)
    assert torch.equal(got, fused_update(x, [out], [1.0, eps64], (2 * eps64).sqrt(), noise=z, backend="torch"))


X = torch.zeros(4, 3)
BAD_CALLS = [
    (dict(x=[1.0], model_out=X), TypeError, "x must be a tensor"),
    (dict(x=X.int(), model_out=X.int()), TypeError, "x must be float32"),
    (dict(x=X, model_out=X[:2]), ValueError, "model_out must have x's shape"),
    (dict(x=X, model_out=X.double()), TypeError, "model_out must have x's dtype"),
    (dict(x=X, model_out=X, coefs=(1.0,)), ValueError, "coefs must be a pair"),
    (dict(x=X, model_out=X, coefs=(1.0, torch.ones(3))), ValueError, "coefs\\[1\\] .*\\[B\\] = \\[4\\]"),
    (dict(x=X, model_out=X, snr=-0.1), ValueError, "snr must be a finite number >= 0"),
    (dict(x=X, model_out=X, alpha_i=float("inf")), ValueError, "alpha_i must be a finite number >= 0"),
    (dict(x=X, model_out=X, snr=torch.ones(5)), ValueError, "snr .*\\[B\\] = \\[4\\]"),
    (dict(x=X, model_out=X, norm="global"), ValueError, "norm must be 'sample' or 'batch'"),
    (dict(x=X, model_out=X, seed=None), ValueError, "needs noise: pass noise= or seed="),
    (dict(x=X, model_out=X, noise=X), ValueError, "either noise= or seed="),
    (dict(x=X, model_out=X, seed=[1, 2]), ValueError, "sequence of B = 4 ints"),
    (dict(x=X, model_out=X, offset=-1), ValueError, "offset must be in"),
    (dict(x=X, model_out=X, out=X[:3]), ValueError, "out must have x's shape"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_wrapper_rejects_bad_arguments(kwargs, exc, match, backend):
    kwargs = {"snr": 0.16, "seed": 1, **kwargs}
    if kwargs["seed"] is None:
        del kwargs["seed"]
    with pytest.raises(exc, match=match):
        langevin_update(**kwargs, backend=backend)


def _c(n):
    return torch.ones(n, dtype=torch.float64)


@needs_op
@pytest.mark.parametrize("args,match", [
    (lambda: (X.int(), X.int(), _c(3), None, torch.tensor([1]), 0), "x must be float32"),
    (lambda: (X, X[:2], _c(3), None, torch.tensor([1]), 0), r"model_out must have x's shape \[4, 3\], got \[2, 3\]"),
    (lambda: (X, X, torch.ones(3), None, torch.tensor([1]), 0), "coef must be Double, got Float"),
    (lambda: (X, X, _c(4), None, torch.tensor([1]), 0),
     r"coef must have shape \[3\] or \[3, B\] = \[3, 4\].*got \[4\]"),
    (lambda: (X, X, _c((3, 5)), None, torch.tensor([1]), 0), r"coef must have shape .*got \[3, 5\]"),
    (lambda: (X, X, _c(3), X, torch.tensor([1]), 0), "either noise or seed"),
    (lambda: (X, X, _c(3), None, None, 0), "needs noise"),
    (lambda: (X, X, _c(3), X[:1], None, 0), r"noise must have x's shape \[4, 3\], got \[1, 3\]"),
    (lambda: (X, X, _c(3), None, torch.tensor([1, 2]), 0), r"seed must have shape \[1\] .* \[B\] = \[4\].*got \[2\]"),
    (lambda: (X, X, _c(3), None, torch.tensor([1.0]), 0), "seed must be Long, got Float"),
    (lambda: (X, X, _c(3), None, torch.tensor([1]), -3), "offset must be >= 0, got -3"),
])
def test_op_rejects_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.genflow.langevin_update(*args())
    with pytest.raises(RuntimeError, match=r"out must have x's shape \[4, 3\], got \[3\]"):
        torch.ops.genflow.langevin_update_out(X, X, _c(3), None, torch.tensor([1]), 0, False, torch.empty(3))
