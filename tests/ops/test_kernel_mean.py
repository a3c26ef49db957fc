"""genflow.ops.kernel_weighted_mean (genflow::kernel_weighted_mean and its backward) and its
chunked PyTorch reference against a float64 dense softmax oracle: sigma from 1e-3 (a naive
softmax underflows) to 1e3, log-weights, d from 1 to 512, sizes off every tile, values with
dv != d and values=None, non-contiguous inputs, the lse output, all -inf log-weights, empty N,
thread-count independence, gradcheck (float64) and float32 gradients, opcheck, torch.compile,
argument errors, and the O((N + M) d) memory of a 100k x 100k call."""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import genflow.ops.kernel_mean as KM
from genflow.ops import kernel_weighted_mean

HAS_OP = KM._HAS_OP
BACKENDS = ["torch"] + (["cpu"] if HAS_OP else [])
needs_op = pytest.mark.skipif(not HAS_OP, reason="genflow._C is not built with kernel_weighted_mean")
SIGMAS = [1e-3, 1e-1, 1.0, 10.0, 1e3]
DIMS = [1, 2, 3, 7, 32, 129, 512]
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _inputs(n, m, d, dv, dtype, seed, log_weights=True):
    """Fresh random queries, keys, values and log-weights; points have |x|^2 ~ 1 for every d."""
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    q, k = f(n, d) / math.sqrt(d), f(m, d) / math.sqrt(d)
    v = None if dv is None else f(m, dv)
    lw = f(m) if log_weights else None
    return q, k, v, lw


def dense(q, k, v, sigma, lw=None):
    """The float64 oracle: the full [N, M] score matrix, torch.logsumexp and a softmax product."""
    q, k = q.double(), k.double()
    v = k if v is None else v.double()
    t = ((q[:, None, :] - k[None, :, :]) ** 2).sum(-1) / (2.0 * sigma ** 2)
    s = -t if lw is None else lw.double() - t
    lse = torch.logsumexp(s, 1)
    w = torch.exp(s - lse[:, None])
    return w @ v, lse, w, t


def _f32_slack(w, t, d):
    """Per-row float32 rounding slack of any float32 evaluation: the scores carry errors of about
    sqrt(d) eps |t_ij|, which move the output by about (1 - max_j w_ij) max_j |t_ij| of them
    (none when one key dominates). Zero for well-conditioned rows."""
    live = torch.where(w > 1e-30, t, torch.zeros_like(t)).amax(1)
    return 4 * math.sqrt(d) * EPS[torch.float32] * (1 - w.amax(1)) * live


def _check_close(out, lse, q, k, v, sigma, lw):
    ref, ref_lse, w, t = dense(q, k, v, sigma, lw)
    vals = k if v is None else v
    scale_v = vals.double().abs().max()
    tol = RTOL[out.dtype] * scale_v
    if out.dtype == torch.float32:
        tol = tol + scale_v * _f32_slack(w, t, q.shape[1])[:, None]
    err = (out.double() - ref).abs()
    worst = (err / tol).max().item()
    assert worst <= 1, f"max error {err.max().item():.3e}, {worst:.2f} x the tolerance"
    lse_tol = RTOL[out.dtype] * ref_lse.abs().clamp_min(1.0)
    if out.dtype == torch.float32:
        lse_tol = lse_tol + 4 * math.sqrt(q.shape[1]) * EPS[torch.float32] * t.amax(1)
    lse_err = (lse.double() - ref_lse).abs()
    assert bool((lse_err <= lse_tol).all()), f"lse max error {lse_err.max().item():.3e}"


# ---------------------------------------------------------------- forward vs the dense oracle

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", DIMS)
def test_forward_matches_dense(backend, dtype, d):
    for i, sigma in enumerate(SIGMAS):
        dv = None if i % 2 else 5  # values=None (dv = d) and dv != d
        q, k, v, lw = _inputs((17, 1, 33, 5, 20)[i], 333, d, dv, dtype, seed=100 * d + i, log_weights=i != 2)
        out, lse = kernel_weighted_mean(q, k, v, sigma=sigma, log_weights=lw, return_lse=True, backend=backend)
        assert out.shape == (q.shape[0], d if dv is None else dv) and lse.shape == (q.shape[0],)
        assert out.dtype == dtype and lse.dtype == dtype
        _check_close(out, lse, q, k, v, sigma, lw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, m", [(1, 1), (1, 17), (17, 1), (333, 333), (5, 1000)])
def test_sizes_off_the_tiles(backend, n, m):
    q, k, v, lw = _inputs(n, m, 2, 3, torch.float64, seed=n * 1000 + m)
    out, lse = kernel_weighted_mean(q, k, v, sigma=0.3, log_weights=lw, return_lse=True, backend=backend)
    _check_close(out, lse, q, k, v, 0.3, lw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_max_rescaling(backend, dtype, monkeypatch):
    """Keys ordered by decreasing distance, so every later tile (and reference chunk) raises the
    running max; a naive softmax underflows to 0/0 here (all scores below -1e4)."""
    monkeypatch.setattr(KM, "_KEY_CHUNK", 7)
    q = torch.zeros(3, 2, dtype=dtype)
    radius = torch.linspace(3.0, 1.0, 1000, dtype=torch.float64)
    angle = torch.linspace(0.0, 6.0, 1000, dtype=torch.float64)
    k = (radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)).to(dtype)
    v = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    sigma = 0.005
    assert torch.exp(-((q[:1, None].double() - k.double()) ** 2).sum(-1) / (2 * sigma ** 2)).sum() == 0
    out, lse = kernel_weighted_mean(q, k, v, sigma=sigma, return_lse=True, backend=backend)
    assert torch.isfinite(out).all()
    _check_close(out, lse, q, k, v, sigma, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_weights_minus_inf_gives_nan(backend):
    q, k, v, _ = _inputs(4, 40, 3, 2, torch.float32, seed=1)
    lw = torch.full((40,), -math.inf)
    out, lse = kernel_weighted_mean(q, k, v, sigma=1.0, log_weights=lw, return_lse=True, backend=backend)
    assert torch.isnan(out).all() and (lse == -math.inf).all()
    lw[17] = 0.0  # one live key: its value exactly
    out = kernel_weighted_mean(q, k, v, sigma=1.0, log_weights=lw, backend=backend)
    torch.testing.assert_close(out, v[17].expand(4, 2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queries(backend):
    q, k, v, lw = _inputs(0, 9, 3, 4, torch.float32, seed=2)
    k.requires_grad_(True)
    out, lse = kernel_weighted_mean(q, k, v, sigma=1.0, log_weights=lw, return_lse=True, backend=backend)
    assert out.shape == (0, 4) and lse.shape == (0,)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))


@needs_op
@pytest.mark.parametrize("d", [2, 7, 40])
def test_noncontiguous_inputs(d):
    q, k, v, lw = _inputs(37, 300, d, 3, torch.float32, seed=3)
    expected = kernel_weighted_mean(q, k, v, sigma=0.5, log_weights=lw, backend="cpu")
    qt = q.T.contiguous().T
    kw = torch.zeros(300, 2 * d).index_copy(1, torch.arange(0, 2 * d, 2), k)[:, ::2]
    vt = v.T.contiguous().T
    lws = torch.stack([lw, lw], 1)[:, 0]
    assert not (qt.is_contiguous() or kw.is_contiguous() or vt.is_contiguous() or lws.is_contiguous())
    out = kernel_weighted_mean(qt, kw, vt, sigma=0.5, log_weights=lws, backend="cpu")
    assert torch.equal(out, expected)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, dv", [(2, None), (3, 1), (16, 40), (129, None)])
def test_kernel_matches_reference(dtype, d, dv):
    q, k, v, lw = _inputs(70, 290, d, dv, dtype, seed=4)
    a, la = kernel_weighted_mean(q, k, v, sigma=0.7, log_weights=lw, return_lse=True, backend="cpu")
    b, lb = kernel_weighted_mean(q, k, v, sigma=0.7, log_weights=lw, return_lse=True, backend="torch")
    tol = 10 * RTOL[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.testing.assert_close(la, lb, rtol=tol, atol=tol)


@needs_op
def test_precision_options_are_highest_on_cpu():
    q, k, v, lw = _inputs(20, 50, 64, 3, torch.float32, seed=5)
    outs = [kernel_weighted_mean(q, k, v, sigma=2.0, log_weights=lw, precision=p) for p in KM.PRECISIONS]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_op
@pytest.mark.parametrize("d, dv", [(2, None), (5, 9), (33, 2)])
def test_thread_count_independence(d, dv):
    q, k, v, lw = _inputs(301, 1100, d, dv, torch.float32, seed=6)
    v = k.clone() if v is None else v
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
            out = kernel_weighted_mean(qq, kk, vv, sigma=0.4, log_weights=lw, backend="cpu")
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            results.append([out.detach(), qq.grad, kk.grad, vv.grad])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, dv, sigma", [(1, None, 0.5), (2, None, 0.3), (3, 2, 1.0), (6, None, 2.0), (17, 3, 3.0)])
def test_gradcheck(backend, d, dv, sigma):
    q, k, v, lw = _inputs(5, 21, d, dv, torch.float64, seed=7 + d)
    q.requires_grad_(True)
    k.requires_grad_(True)
    fast = backend == "torch"  # the reference's Python loops make full Jacobians slow
    if v is None:
        fn = lambda a, b: kernel_weighted_mean(a, b, sigma=sigma, log_weights=lw, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k), fast_mode=fast)
    else:
        v.requires_grad_(True)
        fn = lambda a, b, c: kernel_weighted_mean(a, b, c, sigma=sigma, log_weights=lw, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=fast)


def _grads(q, k, v, lw, sigma, backend, weight):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = kernel_weighted_mean(*leaves, sigma=sigma, log_weights=lw, backend=backend)
    (out * weight).sum().backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, dv", [(2, 2), (3, 5), (7, 1), (40, 40), (129, 3)])
def test_float32_gradients_vs_float64(backend, d, dv):
    q, k, v, lw = _inputs(45, 300, d, dv, torch.float64, seed=8 + d)
    weight = torch.randn(45, dv, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sigma = 0.5
    exact = _grads(q, k, v, lw, sigma, "torch", weight)
    got = _grads(q.float(), k.float(), v.float(), lw.float(), sigma, backend, weight.float())
    for name, a, b in zip("qkv", got, exact):
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 2e-5, f"d{name}: relative error {err.item():.2e}"


@needs_op
def test_opcheck():
    q, k, v, lw = _inputs(19, 40, 3, 2, torch.float64, seed=10)
    args = (q, k, v, lw, 1.7, 0)
    torch.library.opcheck(torch.ops.genflow.kernel_weighted_mean, (q, k, k, None, 0.2, 1))
    grads = [x.clone().requires_grad_(True) for x in (q, k, v)]
    torch.library.opcheck(torch.ops.genflow.kernel_weighted_mean, (*grads, lw, 1.7, 0))
    out, lse = torch.ops.genflow.kernel_weighted_mean(*args)
    g = torch.randn_like(out)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.genflow.kernel_weighted_mean_backward,
                              (q, k, v, lw, out, lse, g, 1.7, mask))


@needs_op
def test_torch_compile_fullgraph():
    q, k, v, lw = _inputs(30, 64, 2, None, torch.float32, seed=11)

    def step(x, y):
        return x + 0.1 * (kernel_weighted_mean(x, y, sigma=0.5, log_weights=lw) - x)

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q, k), step(q, k), rtol=0, atol=0)


# ---------------------------------------------------------------- argument errors

def test_errors():
    q, k, v, lw = _inputs(4, 6, 3, 2, torch.float32, seed=12)
    km = kernel_weighted_mean
    with pytest.raises(TypeError, match=r"queries must be float32 or float64, got torch.float16"):
        km(q.half(), k, sigma=1.0)
    with pytest.raises(TypeError, match=r"keys must have queries' dtype torch.float32, got torch.float64"):
        km(q, k.double(), sigma=1.0)
    with pytest.raises(TypeError, match=r"values must be a tensor, got list"):
        km(q, k, [1.0], sigma=1.0)
    with pytest.raises(ValueError, match=r"queries must have shape \[N, d\], got \[12\]"):
        km(q.reshape(-1), k, sigma=1.0)
    with pytest.raises(ValueError, match=r"keys must have shape \[M, d\] = \[M, 3\] \(d of queries\), got \[6, 2\]"):
        km(q, k[:, :2], sigma=1.0)
    with pytest.raises(ValueError, match=r"keys must have at least one row \(M >= 1\), got shape \[0, 3\]"):
        km(q, k[:0], sigma=1.0)
    with pytest.raises(ValueError, match=r"values must have shape \[M, dv\] = \[6, dv\] \(M of keys\), got \[5, 2\]"):
        km(q, k, v[:5], sigma=1.0)
    with pytest.raises(ValueError, match=r"log_weights must have shape \[M\] = \[6\], got \[6, 1\]"):
        km(q, k, v, sigma=1.0, log_weights=lw[:, None])
    with pytest.raises(ValueError, match=r"log_weights must not require grad"):
        km(q, k, v, sigma=1.0, log_weights=lw.clone().requires_grad_(True))
    with pytest.raises(ValueError, match=r"sigma must be a finite number > 0, got 0.0"):
        km(q, k, sigma=0.0)
    with pytest.raises(ValueError, match=r"sigma must be a finite number > 0, got inf"):
        km(q, k, sigma=math.inf)
    with pytest.raises(TypeError, match=r"sigma must be a real number, got str"):
        km(q, k, sigma="1")
    with pytest.raises(ValueError, match=r"precision must be one of \('highest', 'tf32', 'bf16'\), got 'tf23' "
                                         r"\(did you mean 'tf32'\?\)"):
        km(q, k, sigma=1.0, precision="tf23")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        km(q, k, sigma=1.0, backend="gpu")
    meta = torch.empty(6, 3, device="meta")
    with pytest.raises(ValueError, match=r"keys must be on queries' device cpu, got meta"):
        km(q, meta, sigma=1.0)


@needs_op
def test_op_errors():
    q, k, v, lw = _inputs(4, 6, 3, 2, torch.float32, seed=13)
    op = torch.ops.genflow.kernel_weighted_mean
    with pytest.raises(RuntimeError, match=r"keys must have shape \[M, d\] with queries' d = 3, got \[6, 2\]"):
        op(q, k[:, :2], v, None, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"values must have shape \[M, dv\] with keys' M = 6, got \[4, 2\]"):
        op(q, k, v[:4], None, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"log_weights must have shape \[M\] = \[6\], got \[5\]"):
        op(q, k, v, lw[:5], 1.0, 0)
    with pytest.raises(RuntimeError, match=r"scale = 1 / \(2 sigma\^2\) must be finite and > 0, got -1"):
        op(q, k, v, None, -1.0, 0)
    with pytest.raises(RuntimeError, match=r"precision must be 0 \(highest\), 1 \(tf32\) or 2 \(bf16\), got 3"):
        op(q, k, v, None, 1.0, 3)
    with pytest.raises(RuntimeError, match=r"values must be Double, got Float"):
        op(q.double(), k.double(), v, None, 1.0, 0)
    out, lse = op(q, k, v, lw, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[N\] = \[4\], got \[3\]"):
        torch.ops.genflow.kernel_weighted_mean_backward(q, k, v, lw, out, lse[:3], out, 1.0, [True, True, True])
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[N, dv\] = \[4, 2\], got \[4, 3\]"):
        torch.ops.genflow.kernel_weighted_mean_backward(q, k, v, lw, out, lse, q, 1.0, [True, True, True])


# ---------------------------------------------------------------- extreme sigma and +inf log-weights

def _dense_limit_nearest(q, k, v, lw=None):
    """float64 oracle of the sigma -> 0 limit: softmax(lw) over each query's nearest live keys."""
    dist = ((q.double()[:, None, :] - k.double()[None, :, :]) ** 2).sum(-1)
    live = torch.ones(k.shape[0], dtype=torch.bool) if lw is None else lw > -math.inf
    dist = dist.masked_fill(~live, math.inf)
    nearest = dist == dist.amin(1, keepdim=True)
    s = torch.zeros_like(dist) if lw is None else lw.double().expand_as(dist).clone()
    w = torch.softmax(s.masked_fill(~nearest, -math.inf), 1)
    return w @ (k if v is None else v).double(), w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [1e160, 1e300])
def test_huge_sigma_gives_softmax_of_the_log_weights(backend, dtype, sigma):
    """scale = 1 / (2 sigma^2) underflows to 0 (it used to overflow in sigma ** 2): every query
    gets the weights softmax(lw), uniform without log-weights; lse = logsumexp(lw)."""
    q, k, v, lw = _inputs(13, 37, 3, 2, dtype, seed=40)
    out, lse = kernel_weighted_mean(q, k, v, sigma=sigma, log_weights=lw, return_lse=True, backend=backend)
    w = torch.softmax(lw.double(), 0)
    torch.testing.assert_close(out.double(), (w @ v.double()).expand(13, 2), rtol=RTOL[dtype], atol=0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(lw.double(), 0).expand(13), rtol=RTOL[dtype], atol=0)
    out = kernel_weighted_mean(q, k, v, sigma=sigma, backend=backend)
    torch.testing.assert_close(out.double(), v.double().mean(0).expand(13, 2), rtol=RTOL[dtype], atol=0)
    dead = torch.full_like(lw, -math.inf)  # no live key: NaN, as at any sigma
    assert torch.isnan(kernel_weighted_mean(q, k, v, sigma=sigma, log_weights=dead, backend=backend)).all()
    # continuous with a large sigma on the ordinary path
    near = kernel_weighted_mean(q, k, v, sigma=1e6, backend=backend)
    torch.testing.assert_close(near, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, sigma", [(torch.float64, 1e-200), (torch.float32, 1e-25), (torch.float32, 1e-18),
                                          (torch.float64, 1e-153)])
def test_tiny_sigma_gives_the_nearest_key(backend, dtype, sigma):
    """sigma so small that scale overflows the dtype (1e-200, float32 1e-25) or that every score of
    a row overflows to -inf (float32 1e-18 and float64 1e-153 at distances ~1e3): the nearest live
    key's value, no NaN, no division by zero; lse = -scale dmin, -inf where that overflows."""
    q, k, v, lw = _inputs(21, 45, 3, 2, dtype, seed=41)
    q, k = q * 30, k * 30
    ref, _ = _dense_limit_nearest(q, k, v)
    out, lse = kernel_weighted_mean(q, k, v, sigma=sigma, return_lse=True, backend=backend)
    assert torch.equal(out.double(), ref)
    dmin = torch.cdist(q.double(), k.double()).amin(1) ** 2
    ref_lse = -(0.5 / sigma / sigma) * dmin  # -inf where it overflows float64
    ref_lse[ref_lse < -torch.finfo(dtype).max] = -math.inf  # and where it overflows the dtype
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=0)
    lw[torch.cdist(q[:1].double(), k.double()).argmin()] = -math.inf  # query 0's nearest key has weight 0
    ref, _ = _dense_limit_nearest(q, k, v, lw)
    assert torch.equal(kernel_weighted_mean(q, k, v, sigma=sigma, log_weights=lw, backend=backend).double(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_sigma_ties_and_exact_hits(backend):
    """A query equidistant from two keys gets softmax(lw) of the two; a query on a key gets its
    value and lse = lw of that key (the kernel is 1 there)."""
    q = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    v = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    lw = torch.tensor([0.0, math.log(3.0), 0.0], dtype=torch.float64)
    out, lse = kernel_weighted_mean(q, k, v, sigma=1e-200, log_weights=lw, return_lse=True, backend=backend)
    torch.testing.assert_close(out, torch.tensor([[0.25 * 1 + 0.75 * 2], [2.0]], dtype=torch.float64))
    assert lse[0] == -math.inf and lse[1] == pytest.approx(math.log(3.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_overflow_among_rows_that_do_not(backend):
    """float32, sigma = 1e-18: queries near a key stay on the kernel path, far ones take the
    limit; the gradients of both kinds of rows are finite (values: the selection weights)."""
    q, k, v, _ = _inputs(9, 30, 2, 3, torch.float32, seed=42)
    q = q.clone()
    q[:4] = k[:4] + 1e-19  # within a few sigma of key j: scores finite
    q[4:] *= 100
    sigma = 1e-18
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = kernel_weighted_mean(qg, kg, vg, sigma=sigma, backend=backend)
    ref_far, w_far = _dense_limit_nearest(q[4:], k, v)
    assert torch.equal(out[4:].detach().double(), ref_far)
    dense_near = dense(q[:4], k, v, sigma)[0]
    torch.testing.assert_close(out[:4].detach().double(), dense_near, rtol=1e-5, atol=1e-6)
    g = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    out.backward(g)
    assert all(bool(torch.isfinite(t.grad).all()) for t in (qg, kg, vg))
    assert torch.equal(qg.grad[4:], torch.zeros_like(qg.grad[4:]))
    w_near = dense(q[:4], k, v, sigma)[2]
    expect_dv = w_far.T @ g[4:].double() + w_near.T @ g[:4].double()
    torch.testing.assert_close(vg.grad.double(), expect_dv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plus_inf_log_weights_select_their_keys(backend, dtype):
    """lw_j = +inf: the kernel-weighted mean over those keys only (the limit lw_j -> inf), lse = +inf,
    gradients equal the selected problem's; the same on every backend."""
    q, k, v, lw = _inputs(11, 40, 3, 2, dtype, seed=43)
    lw[[3, 17, 31]] = math.inf
    qg = q.clone().requires_grad_(True)
    out, lse = kernel_weighted_mean(qg, k, v, sigma=0.7, log_weights=lw, return_lse=True, backend=backend)
    chosen = torch.full_like(lw, -math.inf)
    chosen[[3, 17, 31]] = 0.0
    ref, _, _, _ = dense(q, k, v, 0.7, chosen)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[dtype] * 10, atol=RTOL[dtype])
    assert bool((lse == math.inf).all())
    out.sum().backward()
    q2 = q.clone().requires_grad_(True)
    kernel_weighted_mean(q2, k, v, sigma=0.7, log_weights=chosen, backend=backend).sum().backward()
    torch.testing.assert_close(qg.grad, q2.grad)
    plain = kernel_weighted_mean(q, k, v, sigma=0.7, log_weights=lw.nan_to_num(posinf=0.0), backend=backend)
    assert torch.isfinite(plain).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_of_every_numeric_type(backend):
    import numpy as np

    q, k, v, lw = _inputs(6, 10, 2, 2, torch.float64, seed=44)
    ref = kernel_weighted_mean(q, k, v, sigma=0.5, log_weights=lw, backend=backend)
    for sigma in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64),
                  np.int64(1) / 2):
        assert torch.equal(kernel_weighted_mean(q, k, v, sigma=sigma, log_weights=lw, backend=backend), ref)
    assert torch.equal(kernel_weighted_mean(q, k, v, sigma=np.int64(2), backend=backend),
                       kernel_weighted_mean(q, k, v, sigma=2.0, backend=backend))


def test_sigma_errors_name_sigma():
    import numpy as np

    q, k, _, _ = _inputs(4, 6, 3, None, torch.float32, seed=45)
    for bad in (0.0, -1.0, math.nan, math.inf, -math.inf, np.float64(0.0), torch.tensor(-2.0)):
        with pytest.raises(ValueError, match=r"sigma must be a finite number > 0, got"):
            kernel_weighted_mean(q, k, sigma=bad)
    for bad in ("1", None, [1.0], True, torch.ones(2), np.ones(3)):
        with pytest.raises(TypeError, match=r"sigma must be a real number"):
            kernel_weighted_mean(q, k, sigma=bad)


# ---------------------------------------------------------------- CUDA requested where there is none

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_cuda_requested_without_cuda_names_the_argument(monkeypatch):
    """genflow._extension.check_device (the one device check): gf.sample(device="cuda"), the ops'
    backend="cuda"; the messages of a CPU build, of a CUDA build without a visible GPU and of a GPU
    index past the last."""
    import genflow as gf
    from genflow._extension import check_device

    model = gf.Model(lambda x, t: torch.zeros_like(x), gf.VP(), "eps")
    with pytest.raises(ValueError, match=r"device='cuda' asks for CUDA, but this torch build has no CUDA support"):
        gf.sample(model, (4, 2), steps=2, device="cuda")
    assert gf.sample(model, (4, 2), steps=2, device=torch.device("cpu")).shape == (4, 2)
    q, k, _, _ = _inputs(4, 6, 2, None, torch.float32, seed=46)
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs genflow._C built with CUDA kernels"):
        kernel_weighted_mean(q, k, sigma=1.0, backend="cuda")
    with pytest.raises(ValueError, match=r"device must be a device such as 'cpu' or 'cuda:0', got 'gpu'"):
        check_device("device", "gpu")
    with pytest.raises(TypeError, match=r"device must be a device .* got float 1.0"):
        check_device("device", 1.0)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"x_device='cuda:0' asks for CUDA, but no GPU is visible"):
        check_device("x_device", "cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device=3 asks for GPU 3, but this machine shows 2 \(indices 0..1\)"):
        check_device("device", 3)
    assert check_device("device", "cuda:1") == torch.device("cuda", 1) and check_device("device", None) is None


# ---------------------------------------------------------------- memory at 100k x 100k

@needs_op
def test_memory_100k_by_100k():
    """N = M = 100,000, d = 2, float32: the peak RSS grows by far less than 1 GB (a dense score
    matrix would take 40 GB). Run in a fresh process so that ru_maxrss measures this call only."""
    script = textwrap.dedent("""
        import resource, time, torch
        from genflow.ops import kernel_weighted_mean
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(100_000, 2, generator=g), torch.randn(100_000, 2, generator=g)
        kernel_weighted_mean(q[:10], k[:10], sigma=0.1)  # warm up: thread pool, dispatch
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        out = kernel_weighted_mean(q, k, sigma=0.1)
        wall = time.perf_counter() - t0
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert torch.isfinite(out).all()
        print(growth, wall)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    growth_kib, wall = res.stdout.split()
    assert int(growth_kib) < 1024 * 1024, f"peak RSS grew by {int(growth_kib) / 1024:.0f} MiB"
    print(f"100k x 100k, d=2: {float(wall):.2f} s, peak RSS growth {int(growth_kib) / 1024:.1f} MiB")


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

needs_cuda = pytest.mark.skipif(
    not (HAS_OP and torch.cuda.is_available() and __import__("genflow._extension").
         _extension.has_cuda_kernels()), reason="needs the CUDA kernels and a GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dv", [None, 1, 5])
def test_cuda_matches_the_dense_oracle(dtype, d, dv):
    """The CUDA kernel (small-d register path, general path, tails) against the float64 oracle,
    with every sigma and log-weights; and its backward against the CPU op's."""
    for i, sigma in enumerate(SIGMAS):
        q, k, v, lw = _inputs((17, 1, 333, 5, 20)[i], (333, 1000, 17, 1, 257)[i], d, dv, dtype, seed=7 * d + i)
        out, lse = kernel_weighted_mean(q.cuda(), k.cuda(), None if v is None else v.cuda(), sigma=sigma,
                                        log_weights=lw.cuda(), return_lse=True)
        _check_close(out.cpu(), lse.cpu(), q, k, v, sigma, lw)
    q, k, v, lw = _inputs(65, 129, d, dv, dtype, seed=d)
    grads = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_(True) for t in (q, k, k if v is None else v)]
        out = kernel_weighted_mean(leaves[0], leaves[1], None if v is None else leaves[2], sigma=0.7,
                                   log_weights=lw.to(device))
        g = torch.autograd.grad(out.square().sum(), leaves[:2] if v is None else leaves)
        grads.append([t.cpu() for t in g])
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


@needs_cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("d", [32, 129, 512])
def test_cuda_tensor_core_precisions(precision, d):
    """The opt-in tensor-core paths (float32, d >= 32): close to the exact result at the
    precision of the distance products (TF32 ~1e-3, BF16 ~1e-2 relative on the scores)."""
    q, k, v, lw = _inputs(300, 700, d, 3, torch.float32, seed=d)
    exact = kernel_weighted_mean(q.cuda(), k.cuda(), v.cuda(), sigma=1.0, log_weights=lw.cuda())
    fast = kernel_weighted_mean(q.cuda(), k.cuda(), v.cuda(), sigma=1.0, log_weights=lw.cuda(), precision=precision)
    tol = 2e-2 if precision == "tf32" else 1e-1
    torch.testing.assert_close(fast, exact, rtol=tol, atol=tol * v.abs().max().item())
