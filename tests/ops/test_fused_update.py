"""genflow.ops.fused_update: the compiled op against the pure-PyTorch reference, aliasing,
thread-count independence, opcheck / torch.compile / gradcheck, and argument errors."""
import pytest
import torch

from genflow._extension import HAS_EXTENSION, has_cuda_kernels
from genflow.ops import fused_update, randn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_cuda_kernels() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# kernel vs reference: both accumulate with the same explicit fmas, emulated exactly in the
# reference for float32 accumulation, so only float64 (double rounding of its fma) may differ.
TOL = {
    torch.float32: dict(rtol=0.0, atol=0.0),
    torch.float64: dict(rtol=1e-13, atol=1e-13),
    torch.bfloat16: dict(rtol=0.0, atol=0.0),
    torch.float16: dict(rtol=0.0, atol=0.0),
}
needs_ext = pytest.mark.skipif(not HAS_EXTENSION, reason="genflow._C is not built")
NOISE_KINDS = ["none", "supplied", "seed", "per_sample_seed"]


def _make(shape, dtype, device, layout, gen):
    """A fresh tensor of ``shape`` in the given memory layout (contiguous, transposed, sliced)."""
    if layout == "contiguous":
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if layout == "transposed":  # [B, D] viewed from a [D, B] buffer
        base = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return base.transpose(0, -1) if len(shape) > 1 else base
    # sliced: every other column of a wider buffer
    wide = shape[:-1] + (2 * shape[-1] + 1,)
    base = torch.randn(wide, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return base[..., 1::2]


def _case(K, per_sample, noise_kind, shape, dtype, device, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, device, layout, gen)
    terms = [_make(shape, dtype, device, layout, gen) for _ in range(K)]
    B = shape[0]

    def coef(v):
        if per_sample:
            return (v + 0.1 * torch.randn(B, generator=gen, dtype=torch.float64)).to(device)
        return v

    coefs = [coef(0.9)] + [coef(0.3 / (k + 1)) for k in range(K)]
    kwargs = {}
    scale = 0.0
    if noise_kind != "none":
        scale = coef(0.25)
    if noise_kind == "supplied":
        kwargs["noise"] = _make(shape, dtype, device, layout, gen)
    elif noise_kind == "seed":
        kwargs.update(seed=1234, offset=5)
    elif noise_kind == "per_sample_seed":
        kwargs.update(seed=[1000 + b for b in range(B)], offset=2)
    return x, terms, coefs, scale, kwargs


def _assert_close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])


# ---------------------------------------------------------------- kernel == reference

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("noise_kind", NOISE_KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_matches_reference(device, dtype, K, per_sample, noise_kind, layout):
    x, terms, coefs, scale, kwargs = _case(K, per_sample, noise_kind, (6, 37), dtype, device, layout)
    got = fused_update(x, terms, coefs, scale, **kwargs)
    ref = fused_update(x, terms, coefs, scale, backend="torch", **kwargs)
    _assert_close(got, ref, dtype)
    assert got.is_contiguous()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (65537,), (3, 1, 7), (5, 13107)])
@pytest.mark.parametrize("noise_kind", ["supplied", "seed", "per_sample_seed"])
def test_odd_sizes(device, dtype, shape, noise_kind):
    per_sample = len(shape) > 1
    x, terms, coefs, scale, kwargs = _case(2, per_sample, noise_kind, shape, dtype, device, "contiguous", seed=1)
    _assert_close(fused_update(x, terms, coefs, scale, **kwargs),
                  fused_update(x, terms, coefs, scale, backend="torch", **kwargs), dtype)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [77, [5, 6, 7, 8]])
def test_generated_noise_equals_supplied_stream(device, dtype, seed):
    """In-kernel noise is exactly randn(seed, offset) in x's dtype: bitwise equal results."""
    x, terms, coefs, _, _ = _case(2, True, "none", (4, 301), dtype, device, "contiguous")
    z = randn(x.shape, seed=seed, offset=3, dtype=dtype, device=device)
    a = fused_update(x, terms, coefs, 0.7, seed=seed, offset=3)
    b = fused_update(x, terms, coefs, 0.7, noise=z)
    assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_exact_small_integers(device):
    """Coefficients and values that are exact in float32 give exact results."""
    x = torch.arange(12.0, device=device).reshape(3, 4)
    t = torch.ones(3, 4, device=device)
    out = fused_update(x, [t, 2 * t], [2.0, 3.0, -1.0], 0.5, noise=4 * t)
    assert torch.equal(out, 2 * x + 3 - 2 + 2)
    per = fused_update(x, [t], [torch.tensor([1.0, 2.0, 3.0], device=device), 1.0])
    assert torch.equal(per, x * torch.tensor([[1.0], [2.0], [3.0]], device=device) + 1)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_zero_dim_and_empty(device):
    x = torch.tensor(2.0, device=device)
    assert torch.equal(fused_update(x, [x], [0.5, 0.25]), torch.tensor(1.5, device=device))
    n0 = fused_update(x, [], [1.0], 1.0, seed=3)
    assert torch.equal(n0, fused_update(x, [], [1.0], 1.0, seed=3, backend="torch"))
    e = torch.empty(0, 5, device=device)
    assert fused_update(e, [e], [1.0, 2.0], 1.0, seed=1).shape == (0, 5)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1), (3, 2), (5, 3), (4, 7), (5, 8), (2, 4, 9), (3, 1001)])
@pytest.mark.parametrize("noise_kind", NOISE_KINDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_group_loop_on_host(dtype, shape, noise_kind, per_sample):
    """The CUDA kernel's per-group work (groups of 4 of one stream, crossing samples when one
    seed is used; whole aligned groups as one vector access where per_sample % 4 == 0 or nothing
    is per sample) run serially on the host equals the CPU kernel bitwise."""
    x, terms, coefs, scale, kwargs = _case(3, per_sample, noise_kind, shape, dtype, "cpu", "contiguous", seed=4)
    expect = fused_update(x, terms, coefs, scale, **kwargs)
    B = shape[0]
    coef = torch.stack([c if isinstance(c, torch.Tensor) else torch.full((B,), float(c), dtype=torch.float64)
                        for c in coefs + [scale]])
    seed = None
    if "seed" in kwargs:
        seed = torch.tensor(kwargs["seed"] if isinstance(kwargs["seed"], list) else [kwargs["seed"]])
    got = torch.ops.genflow._fused_update_grouped(x, terms, coef if per_sample else coef[:, 0].contiguous(),
                                                 kwargs.get("noise"), seed, kwargs.get("offset", 0), False)
    assert torch.equal(got, expect)
    if seed is not None:
        stream = torch.ops.genflow._fused_update_grouped(x, [], torch.tensor([0.0, 1.0], dtype=torch.float64),
                                                        None, seed, 3, True)
        assert torch.equal(stream, randn(shape, seed=seed if seed.numel() > 1 else int(seed), offset=3, dtype=dtype))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", ["x", "term", "noise"])
def test_cuda_group_loop_misaligned_arrays(dtype, misaligned):
    """One array starting one element past a vector boundary sends every group down the scalar
    path of the CUDA kernel's group loop; the result is bitwise the same."""
    shape = (6, 16)

    def array(name, seed):
        buf = torch.randn(1 + 6 * 16, generator=torch.Generator().manual_seed(seed)).to(dtype)
        return buf[1:].view(shape) if name == misaligned else buf[:-1].view(shape).clone()

    x, t, noise = array("x", 1), array("term", 2), array("noise", 3)
    coef = torch.tensor([[0.5] * 6, [0.25] * 6, [0.125] * 6], dtype=torch.float64) * torch.arange(1, 7)
    expect = fused_update(x, [t], [coef[0], coef[1]], coef[2], noise=noise)
    got = torch.ops.genflow._fused_update_grouped(x, [t], coef.contiguous(), noise, None, 0, False)
    assert torch.equal(got, expect)


# ---------------------------------------------------------------- out=, aliasing, layouts

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise_kind", ["supplied", "seed", "per_sample_seed"])
def test_out_aliasing_x(device, dtype, noise_kind):
    x, terms, coefs, scale, kwargs = _case(3, True, noise_kind, (4, 5000), dtype, device, "contiguous")
    expect = fused_update(x, terms, coefs, scale, **kwargs)
    ptr = x.data_ptr()
    got = fused_update(x, terms, coefs, scale, out=x, **kwargs)
    assert got is x and x.data_ptr() == ptr
    assert torch.equal(x, expect)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_out_aliasing_a_term_and_noise(device):
    x, terms, coefs, scale, kwargs = _case(2, False, "supplied", (3, 999), torch.float32, device, "contiguous")
    expect = fused_update(x, terms, coefs, scale, **kwargs)
    t0 = terms[0]
    fused_update(x, terms, coefs, scale, out=t0, **kwargs)
    assert torch.equal(t0, expect)
    x, terms, coefs, scale, kwargs = _case(2, False, "supplied", (3, 999), torch.float32, device, "contiguous")
    noise = kwargs["noise"]
    fused_update(x, terms, coefs, scale, out=noise, **kwargs)
    assert torch.equal(noise, expect)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_out_non_contiguous(device, layout):
    x, terms, coefs, scale, kwargs = _case(2, True, "seed", (6, 37), torch.float32, device, layout)
    expect = fused_update(x, terms, coefs, scale, **kwargs)
    out = _make((6, 37), torch.float32, device, layout, torch.Generator().manual_seed(9))
    assert torch.equal(fused_update(x, terms, coefs, scale, out=out, **kwargs), expect)
    # in place on a non-contiguous x
    fused_update(x, terms, coefs, scale, out=x, **kwargs)
    assert torch.equal(x, expect)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_uses_row_major_index(device):
    x = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    got = fused_update(x, [], [1.0], 1.0, seed=8)
    assert torch.equal(got, x + randn(x.shape, seed=8, device=device))


@needs_ext
def test_partial_overlap_rejected():
    buf = torch.randn(101)
    x, out = buf[:100], buf[1:]
    with pytest.raises(RuntimeError, match="overlap|memory location"):
        fused_update(x, [], [2.0], out=out)


# ---------------------------------------------------------------- threads

@needs_ext
@pytest.mark.parametrize("noise_kind", ["seed", "per_sample_seed"])
def test_thread_count_independent(noise_kind):
    x, terms, coefs, scale, kwargs = _case(2, True, noise_kind, (3, 200_003), torch.float32, "cpu", "contiguous")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(fused_update(x, terms, coefs, scale, **kwargs))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


# ---------------------------------------------------------------- opcheck, torch.compile, autograd

def _op_inputs(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, generator=gen).to(device)
    t = torch.randn(4, 9, generator=gen).to(device)
    xd, td = x.double(), t.double()
    return [
        (x, [t], torch.tensor([0.9, 0.1, 0.2], dtype=torch.float64), None, torch.tensor([3]), 2),
        (x, [], torch.tensor([1.0, 0.5], dtype=torch.float64), torch.randn(4, 9, generator=gen).to(device), None, 0),
        (xd, [td, td], torch.rand(4, 4, generator=gen, dtype=torch.float64).to(device), None,
         torch.arange(4, device=device), 1),
        (x.half(), [t.half()], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), None, None, 0),
        (xd.requires_grad_(), [td.requires_grad_()], torch.rand(3, 4, dtype=torch.float64, device=device),
         torch.randn(4, 9, dtype=torch.float64, device=device).requires_grad_(), None, 0),
    ]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(5))
def test_opcheck_fused_update(device, i):
    args = _op_inputs(device)[i]
    torch.library.opcheck(torch.ops.genflow.fused_update.default, args)
    if not any(a.requires_grad for a in [args[0], *args[1]]):
        out = torch.empty_like(args[0])
        torch.library.opcheck(torch.ops.genflow.fused_update_out.default, (*args, out))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_philox_normal(device):
    normal, normal_out = torch.ops.genflow.philox_normal.default, torch.ops.genflow.philox_normal_out.default
    torch.library.opcheck(normal, (torch.tensor([5], device=device), 3, [4, 7], torch.float32))
    torch.library.opcheck(normal, (torch.arange(4, device=device), 0, [4, 3], torch.bfloat16))
    torch.library.opcheck(normal_out, (torch.tensor([5]), 3, torch.empty(4, 7, device=device)))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(x, eps, sigma):
        x0 = fused_update(x, [eps], [1.0, -0.5])
        return fused_update(x, [x0], [0.5, 0.5], sigma, seed=[1, 2, 3], offset=4)

    def step_inplace(x, eps):
        fused_update(x, [eps], [0.9, 0.1], 0.2, seed=7, offset=1, out=x)
        return x

    x = torch.randn(3, 10, device=device)
    eps = torch.randn(3, 10, device=device)
    sigma = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64, device=device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, eps, sigma), step(x, eps, sigma))
    xa, xb = x.clone(), x.clone()
    torch.compile(step_inplace, fullgraph=True, backend="aot_eager")(xa, eps)
    step_inplace(xb, eps)
    assert torch.equal(xa, xb)
    draw = torch.compile(lambda: randn((2, 5), seed=3, offset=1, device=device), fullgraph=True, backend="aot_eager")
    assert torch.equal(draw(), randn((2, 5), seed=3, offset=1, device=device))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("noise_kind", ["supplied", "seed"])
def test_gradcheck(device, per_sample, noise_kind):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    shape = (3, 3) if per_sample else (3,)  # [K+2, B] or [K+2], K = 1
    coef = torch.rand(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    noise = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    if noise_kind == "supplied":
        fn = lambda x, t, c, n: torch.ops.genflow.fused_update(x, [t], c, n, None, 0)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, t, coef, noise))
    else:
        seed = torch.tensor([4])
        fn = lambda x, t, c: torch.ops.genflow.fused_update(x, [t], c, None, seed, 3)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, t, coef))


@needs_ext
def test_wrapper_backward_through_per_sample_coefs():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    out = fused_update(x, [], [c0])
    out.sum().backward()
    assert torch.allclose(x.grad, c0.detach()[:, None].expand(2, 3))
    assert torch.allclose(c0.grad, x.detach().sum(1))


# ---------------------------------------------------------------- backends

def test_reference_backend_always_available():
    x = torch.randn(2, 3)
    out = fused_update(x, [x], [1.0, 1.0], backend="torch")
    assert torch.allclose(out, 2 * x)


@needs_ext
def test_backend_errors():
    x = torch.randn(2, 3)
    assert torch.equal(fused_update(x, [], [2.0], backend="cpu"), 2 * x)
    with pytest.raises((RuntimeError, ValueError), match="backend"):
        fused_update(x, [], [2.0], backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        fused_update(x, [], [2.0], backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        randn(3, seed=0, backend="triton")


# ---------------------------------------------------------------- argument errors (wrapper)

X = torch.zeros(4, 3)
BAD_CALLS = [
    (dict(x=[1.0]), TypeError, "x must be a tensor"),
    (dict(x=X.int()), TypeError, "x must be float32"),
    (dict(x=X, terms=X), TypeError, "terms must be a list"),
    (dict(x=X, terms=[X] * 5, coefs=[1.0] * 6), ValueError, "at most 4"),
    (dict(x=X, terms=[X], coefs=[1.0]), ValueError, "coefs must have len\\(terms\\) \\+ 1 = 2"),
    (dict(x=X, terms=[X.double()], coefs=[1.0, 1.0]), TypeError, "terms\\[0\\] must have x's dtype"),
    (dict(x=X, terms=[X, X[:, :2]], coefs=[1.0, 1.0, 1.0]), ValueError, "terms\\[1\\] must have x's shape"),
    (dict(x=X, terms=[X], coefs=[1.0, torch.ones(3)]), ValueError, "coefs\\[1\\] .*\\[B\\] = \\[4\\]"),
    (dict(x=X, terms=[X], coefs=[1.0, "a"]), TypeError, "coefs\\[1\\] must be a float"),
    (dict(x=X, noise_scale=torch.ones(5), seed=1), ValueError, "noise_scale .*\\[B\\] = \\[4\\]"),
    (dict(x=X, noise_scale=0.5), ValueError, "noise_scale is nonzero but neither"),
    (dict(x=X, noise_scale=torch.ones(4)), ValueError, "noise_scale is nonzero but neither noise= nor seed="),
    (dict(x=X, noise_scale=1.0, noise=X, seed=1), ValueError, "either noise= or seed="),
    (dict(x=X, noise_scale=1.0, noise=X[:2]), ValueError, "noise must have x's shape"),
    (dict(x=X, noise_scale=1.0, seed=[1, 2]), ValueError, "sequence of B = 4 ints"),
    (dict(x=X, noise_scale=1.0, seed=1.5), TypeError, "seed must be an int"),
    (dict(x=X, noise_scale=1.0, seed=2**64), ValueError, "seed must be in"),
    (dict(x=X, noise_scale=1.0, seed=torch.ones(4)), TypeError, "seed tensor must be int64"),
    (dict(x=X, noise_scale=1.0, seed=torch.ones(3, dtype=torch.int64)), ValueError, "seed tensor must have shape"),
    (dict(x=X, noise_scale=1.0, seed=1, offset=-1), ValueError, "offset must be in"),
    (dict(x=X, noise_scale=1.0, seed=1, offset=1.0), TypeError, "offset must be an int"),
    (dict(x=X, out=X.double()), TypeError, "out must have x's dtype"),
    (dict(x=X, out=X[:3]), ValueError, "out must have x's shape"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_wrapper_rejects_bad_arguments(kwargs, exc, match, backend):
    with pytest.raises(exc, match=match):
        fused_update(**kwargs, backend=backend)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(shape=(2, -1), seed=0), ValueError, "shape must be"),
    (dict(shape=(2, 3), seed=0, dtype=torch.int32), TypeError, "dtype must be"),
    (dict(shape=(2, 3), seed=[1, 2, 3]), ValueError, "sequence of B = 2"),
    (dict(shape=(), seed=[1, 2]), ValueError, "per-sample seeds need"),
    (dict(shape=(2, 3), seed=0, offset=-2), ValueError, "offset"),
])
def test_randn_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        randn(kwargs.pop("shape"), **kwargs)


# ---------------------------------------------------------------- argument errors (op)

def _c(n):
    return torch.ones(n, dtype=torch.float64)


@needs_ext
@pytest.mark.parametrize("args,match", [
    (lambda: (X.int(), [], _c(2), None, None, 0), "x must be float32"),
    (lambda: (X, [X] * 5, _c(7), None, None, 0), "terms must hold at most 4"),
    (lambda: (X, [X[:2]], _c(3), None, None, 0), r"terms\[0\] must have x's shape \[4, 3\], got \[2, 3\]"),
    (lambda: (X, [X.half()], _c(3), None, None, 0), r"terms\[0\] must have x's dtype Float, got Half"),
    (lambda: (X, [X], torch.ones(3), None, None, 0), "coef must be Double, got Float"),
    (lambda: (X, [X], _c(4), None, None, 0),
     r"coef must have shape \[K\+2\] = \[3\] or \[K\+2, B\] = \[3, 4\].*got \[4\]"),
    (lambda: (X, [X], _c((3, 5)), None, None, 0), r"coef must have shape .*got \[3, 5\]"),
    (lambda: (X, [], _c(2), X, torch.tensor([1]), 0), "either noise or seed"),
    (lambda: (X, [], _c(2), X[:1], None, 0), r"noise must have x's shape \[4, 3\], got \[1, 3\]"),
    (lambda: (X, [], _c(2), None, torch.tensor([1, 2]), 0), r"seed must have shape \[1\] .* \[B\] = \[4\].*got \[2\]"),
    (lambda: (X, [], _c(2), None, torch.tensor([1.0]), 0), "seed must be Long, got Float"),
    (lambda: (X, [], _c(2), None, torch.tensor([1]), -3), "offset must be >= 0, got -3"),
    (lambda: (X, [], _c(2), None, None, 0), r"seed \(or noise\) is required"),
])
def test_op_rejects_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.genflow.fused_update(*args())


@needs_ext
def test_op_out_and_philox_errors():
    coef = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"out must have x's shape \[4, 3\], got \[3\]"):
        torch.ops.genflow.fused_update_out(X, [], coef, None, None, 0, torch.empty(3))
    with pytest.raises(RuntimeError, match="out must be float32"):
        torch.ops.genflow.philox_normal_out(torch.tensor([1]), 0, torch.empty(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"seed must have shape \[1\] .* \[B\] = \[3\]"):
        torch.ops.genflow.philox_normal(torch.tensor([1, 2]), 0, [3, 2], torch.float32)


@pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_kernels()), reason="needs the CUDA kernels")
def test_cuda_indexing_beyond_2_pow_31():
    """More than 2^31 elements (float16, a strided view): 64-bit indices reach the tail."""
    half = 2**30 + 600
    try:
        storage = torch.zeros(2, half, 2, dtype=torch.float16, device="cuda")
        term = torch.ones(2, half, dtype=torch.float16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2^31-element test")
    x = storage[..., 0]  # [2, 2^30 + 600], stride 2 in the last dimension
    x[1, -5:] = torch.arange(1, 6, dtype=torch.float16, device="cuda")
    out = fused_update(x, [term], [2.0, 3.0])
    assert out.numel() > 2**31
    assert torch.equal(out[1, -5:].cpu(), torch.tensor([5.0, 7.0, 9.0, 11.0, 13.0], dtype=torch.float16))
    assert bool((out[0] == 3).all()) and bool((out[1, :-5] == 3).all())
    fused_update(x, [term], [2.0, 3.0], out=x)  # in place into the strided view
    assert torch.equal(storage[1, -5:, 0].cpu(), torch.tensor([5.0, 7.0, 9.0, 11.0, 13.0], dtype=torch.float16))


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled extension")
@pytest.mark.parametrize("per_sample_size", [1, 3, 7, 64, 65])
@pytest.mark.parametrize("noise_kind", ["none", "supplied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_many_small_samples_with_per_sample_coefficients(per_sample_size, noise_kind, dtype):
    """Per-sample coefficients on samples of <= 64 elements take the CPU kernel's small-sample
    path (one call per chunk); chunks of the thread split cut samples apart when the size is odd.
    Equal to the reference (bitwise for float32/bfloat16, whose reference rounds the same explicit
    fmas), and bitwise the same with 1 and 2 threads."""
    g = torch.Generator().manual_seed(per_sample_size)
    batch = 70000 // per_sample_size + 3
    x, t1, t2, z = (torch.randn(batch, per_sample_size, generator=g).to(dtype) for _ in range(4))
    coefs = [torch.rand(batch, generator=g, dtype=torch.float64) for _ in range(3)]
    scale = torch.rand(batch, generator=g, dtype=torch.float64) if noise_kind == "supplied" else 0.0
    noise = z if noise_kind == "supplied" else None
    want = fused_update(x, [t1, t2], coefs, scale, noise=noise, backend="torch")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fused_update(x, [t1, t2], coefs, scale, noise=noise, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    _assert_close(results[0], want, dtype)
    if dtype != torch.float64:
        assert torch.equal(results[0], want)
