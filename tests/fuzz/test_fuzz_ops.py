"""Fuzz the fused ops (``genflow.ops`` wrappers and ``torch.ops.genflow``) against their
pure-PyTorch references: random shapes (0-size, 1, odd, prime), layouts (transposed, sliced,
expanded), dtypes and values (huge, tiny, NaN, Inf), and invalid arguments."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from genflow import ops
from genflow.ops.kernel_mean import reference_forward
from tests.fuzz.strategies import (BAD_DTYPES, absmax, BAD_FLOATS, FLOAT_DTYPES, LAYOUTS, TOL, VALUES, close,
                                   finite_floats, fuzz, invalid, make_values, shapes, tensors, valid,
                                   with_layout)

coefs = st.one_of(finite_floats(-4.0, 4.0), st.sampled_from([0.0, 1.0, -1.0, 1e30, 1e-30]))


@st.composite
def fused_case(draw):
    shape = draw(shapes())
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    k = draw(st.integers(0, ops.MAX_TERMS))
    x = draw(tensors(shape, dtype))
    terms = [draw(tensors(shape, dtype)) for _ in range(k)]
    per_sample = draw(st.booleans())
    cs = [draw(coefs) for _ in range(k + 1)]
    if per_sample:
        cs = [torch.full((shape[0],), c, dtype=torch.float64) * (1 + torch.arange(shape[0])) for c in cs]
    noise_kind = draw(st.sampled_from(["none", "tensor", "seed"]))
    return x, terms, cs, noise_kind, draw(st.integers(0, 2**63 - 1)), draw(st.integers(0, 2**20))


@fuzz(1000)
@given(fused_case())
def test_fused_update_matches_reference(case):
    x, terms, cs, noise_kind, seed, offset = case
    kw = {}
    if noise_kind == "tensor":
        kw = {"noise": make_values(x.shape, x.dtype, offset), "noise_scale": 0.5}
    elif noise_kind == "seed":
        kw = {"seed": seed, "offset": offset, "noise_scale": -0.7}
    out = valid(ops.fused_update, x, terms, cs, **kw)
    ref = valid(ops.fused_update, x, terms, cs, backend="torch", **kw)
    rtol, atol = TOL[x.dtype]
    close(out, ref, rtol, atol, "fused_update kernel vs reference")
    assert out.dtype == x.dtype and out.is_contiguous()
    if x.numel() and noise_kind != "seed" and x.dtype == torch.float64:  # against plain float64 math
        expect = cs[0] * x if not isinstance(cs[0], torch.Tensor) else cs[0].reshape((-1,) + (1,) * (x.dim() - 1)) * x
        for c, t in zip(cs[1:], terms):
            expect = expect + (c.reshape((-1,) + (1,) * (x.dim() - 1)) if isinstance(c, torch.Tensor) else c) * t
        if noise_kind == "tensor":
            expect = expect + 0.5 * kw["noise"]
        finite = torch.isfinite(expect) & torch.isfinite(out)
        close(out[finite], expect[finite], 1e-9, 1e-290, "fused_update vs float64 math")


@fuzz(600)
@given(shape=shapes(min_batch=1), bad=st.integers(0, 11), dtype=st.sampled_from(FLOAT_DTYPES))
def test_fused_update_rejects_invalid(shape, bad, dtype):
    x = torch.zeros(shape, dtype=dtype)
    f = ops.fused_update
    if bad == 0:
        invalid("x", f, x.to(BAD_DTYPES[len(shape) % len(BAD_DTYPES)]), [], [1.0])
    elif bad == 1:
        invalid("terms", f, x, [torch.zeros(shape[0] + 1, dtype=dtype)], [1.0, 1.0])
    elif bad == 2:
        invalid("coefs", f, x, [x], [1.0])
    elif bad == 3:
        invalid("terms", f, x, [x] * (ops.MAX_TERMS + 1), [1.0] * (ops.MAX_TERMS + 2))
    elif bad == 4:
        invalid("coefs[0]", f, x, [], [torch.ones(shape[0] + 2)])
    elif bad == 5:
        invalid("noise_scale", f, x, [], [1.0], 1.0)
    elif bad == 6:
        invalid("offset", f, x, [], [1.0], 1.0, seed=1, offset=-1)
    elif bad == 7:
        invalid("seed", f, x, [], [1.0], 1.0, seed="1")
    elif bad == 8:
        invalid("terms[0]", f, x, [x.double() if dtype != torch.float64 else x.float()], [1.0, 1.0])
    elif bad == 9:
        invalid("backend", f, x, [], [1.0], backend="gpu")
    elif bad == 10:
        invalid("out", f, x, [], [1.0], out=torch.zeros(shape[0] + 1, dtype=dtype))
    else:
        invalid(("noise", "seed"), f, x, [], [1.0], 1.0, noise=x, seed=0)


@fuzz(600)
@given(shape=shapes(max_rank=3), dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(-(2**63), 2**64 - 1),
       offset=st.integers(0, 2**63 - 1), per_sample=st.booleans(), kind=st.sampled_from(["rademacher", "gaussian"]))
def test_philox_streams_match_reference(shape, dtype, seed, offset, per_sample, kind):
    seeds = [seed % 2**63 + i for i in range(shape[0])] if per_sample and shape[0] else seed
    z = valid(ops.randn, shape, seed=seeds, offset=offset, dtype=dtype)
    z_ref = valid(ops.randn, shape, seed=seeds, offset=offset, dtype=dtype, backend="torch")
    assert z.shape == tuple(shape) and z.dtype == dtype
    assert torch.equal(z, z_ref), "philox_normal differs from the reference stream"
    assert bool(torch.isfinite(z).all())
    p = valid(ops.probes, shape, seed=seeds, offset=offset, kind=kind, dtype=dtype)
    if kind == "gaussian":
        assert torch.equal(p, z)
    else:
        assert torch.equal(p, torch.where(z.float() >= 0, 1.0, -1.0).to(dtype))
    assert torch.equal(torch.ops.genflow.philox_normal(ops.fused_update.__globals__["seed_tensor"](
        seeds, shape[0], torch.device("cpu")), offset, list(shape), dtype), z)


@fuzz(300)
@given(bad=st.integers(0, 6), dtype=st.sampled_from(BAD_DTYPES))
def test_philox_rejects_invalid(bad, dtype):
    if bad == 0:
        invalid("dtype", ops.randn, (2, 3), seed=0, dtype=dtype)
    elif bad == 1:
        invalid("shape", ops.randn, (2, -3), seed=0)
    elif bad == 2:
        invalid("offset", ops.randn, (2,), seed=0, offset=-5)
    elif bad == 3:
        invalid("seed", ops.randn, (3, 2), seed=[1, 2])
    elif bad == 4:
        invalid("kind", ops.probes, (3,), seed=0, kind="rademacher_")
    elif bad == 5:
        invalid("seed", ops.probes, (3,), seed=2**64)
    else:
        invalid("dtype", ops.probes, (3,), seed=0, dtype=dtype)


@fuzz(1200)
@given(shape=shapes(), dtype=st.sampled_from(FLOAT_DTYPES), data=st.data())
def test_probe_dot_matches_reference(shape, dtype, data):
    probe = data.draw(tensors(shape, dtype))
    v = data.draw(tensors(shape, dtype))
    b = shape[0]
    scale = data.draw(st.one_of(finite_floats(-1e3, 1e3), st.just(torch.linspace(-2, 2, b, dtype=torch.float64))))
    acc = data.draw(st.sampled_from([None, torch.arange(b, dtype=torch.float64)]))
    out = valid(ops.probe_dot, probe, v, scale=scale, accumulate=acc)
    ref = valid(ops.probe_dot, probe, v, scale=scale, accumulate=acc, backend="torch")
    assert out.shape == (b,) and out.dtype == torch.float64
    close(out, ref, 1e-10, 1e-300, "probe_dot kernel vs reference")
    p64, v64 = (t.double().reshape(b, math.prod(shape[1:])) for t in (probe, v))
    plain = (p64 * v64).sum(1) * (scale if not isinstance(scale, torch.Tensor) else scale)
    plain = plain if acc is None else plain + acc
    ok = torch.isfinite(plain) & ((p64 * v64).abs().sum(1) < 1e290)
    close(out[ok], plain[ok], 1e-9, 1e-9 * absmax((p64 * v64).abs().sum(1)), "probe_dot vs float64 sum")


@fuzz(400)
@given(bad=st.integers(0, 7), shape=shapes(min_batch=1))
def test_probe_dot_rejects_invalid(bad, shape):
    p = torch.ones(shape)
    f = ops.probe_dot
    if bad == 0:
        invalid("probe", f, p.int(), p.int())
    elif bad == 1:
        invalid("v", f, p, p.double())
    elif bad == 2:
        invalid("v", f, p, torch.ones(shape[0] + 1))
    elif bad == 3:
        invalid("scale", f, p, p, scale=float(BAD_FLOATS[len(shape) % 3]))
    elif bad == 4:
        invalid("scale", f, p, p, scale="2")
    elif bad == 5:
        invalid("accumulate", f, p, p, accumulate=torch.zeros(shape[0] + 1, dtype=torch.float64))
    elif bad == 6:
        invalid("probe", f, torch.tensor(1.0), torch.tensor(1.0))
    else:
        invalid("out", f, p, p, out=torch.zeros(shape[0], dtype=torch.float32))


@st.composite
def kwm_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n, m = draw(st.sampled_from([0, 1, 2, 3, 7, 13])), draw(st.sampled_from([1, 2, 5, 11]))
    d, dv = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 4]))
    q = draw(tensors((n, d), dtype, values="normal"))
    k = draw(tensors((m, d), dtype, values="normal"))
    v = draw(tensors((m, dv), dtype, values=draw(st.sampled_from(["normal", "normal", "huge", "tiny", "nan"]))))
    lw = draw(st.sampled_from([None, "finite", "neg_inf"]))
    if lw is not None:
        lw = draw(tensors((m,), dtype, values="normal", layout="contiguous"))
        if lw.numel() > 1:
            lw[0] = -math.inf
    sigma = draw(st.sampled_from([1e-3, 0.1, 0.5, 1.0, 3.0, 100.0]))
    return q, k, v, lw, sigma


@fuzz(700)
@given(kwm_case(), st.booleans())
def test_kernel_weighted_mean_matches_reference(case, values_none):
    q, k, v, lw, sigma = case
    vals = None if values_none else v
    out, lse = valid(ops.kernel_weighted_mean, q, k, vals, sigma=sigma, log_weights=lw, return_lse=True)
    ref, ref_lse = valid(ops.kernel_weighted_mean, q, k, vals, sigma=sigma, log_weights=lw, return_lse=True,
                         backend="torch")
    rtol, atol = (1e-9, 1e-12) if q.dtype == torch.float64 else (2e-3, 1e-3)
    scale = absmax(ref)
    if sigma >= 0.1:  # at sigma = 1e-3 float32 rounding may pick a different nearest key
        close(out, ref, rtol, atol * max(1.0, scale), "kernel_weighted_mean kernel vs reference")
        close(lse, ref_lse, rtol, atol * max(1.0, absmax(ref_lse)), "lse")
    assert out.shape == (q.shape[0], (k if vals is None else v).shape[1])
    if q.dtype == torch.float64:
        out64, _ = reference_forward(q, k, k if vals is None else v, lw, 1.0 / (2 * sigma * sigma))
        close(out, out64, 1e-9, 1e-12 * max(1.0, scale), "kernel_weighted_mean vs float64 reference")


@fuzz(250)
@given(kwm_case())
def test_kernel_weighted_mean_backward_matches_reference(case):
    q, k, v, lw, sigma = case
    if not (bool(torch.isfinite(v).all()) and v.abs().max() < 1e10 and sigma >= 0.1):
        return
    q, k, v = (t.double().detach().requires_grad_() for t in (q, k, v))
    lw = None if lw is None else lw.double()
    grads = []
    for backend in ("auto", "torch"):
        out = valid(ops.kernel_weighted_mean, q, k, v, sigma=sigma, log_weights=lw, backend=backend)
        g = torch.ones_like(out) if out.numel() == 0 else torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        grads.append(torch.autograd.grad(out, (q, k, v), g, allow_unused=True))
    for a, b, name in zip(grads[0], grads[1], "qkv"):
        assert (a is None) == (b is None) or (a is not None and a.numel() == 0) or (b is not None and b.numel() == 0)
        if a is not None and b is not None:
            close(a, b, 1e-8, 1e-10, f"d{name} kernel vs reference")


@fuzz(500)
@given(bad=st.integers(0, 9), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_kernel_weighted_mean_rejects_invalid(bad, dtype):
    q, k = torch.zeros(3, 2, dtype=dtype), torch.ones(4, 2, dtype=dtype)
    f = ops.kernel_weighted_mean
    if bad == 0:
        invalid("queries", f, q.half(), k.half(), sigma=1.0)
    elif bad == 1:
        invalid("keys", f, q, torch.ones(4, 3, dtype=dtype), sigma=1.0)
    elif bad == 2:
        invalid("keys", f, q, torch.ones(0, 2, dtype=dtype), sigma=1.0)
    elif bad == 3:
        invalid("values", f, q, k, torch.ones(5, 1, dtype=dtype), sigma=1.0)
    elif bad == 4:
        invalid("sigma", f, q, k, sigma=BAD_FLOATS[0])
    elif bad == 5:
        invalid("sigma", f, q, k, sigma=-1.0)
    elif bad == 6:
        invalid("sigma", f, q, k, sigma="1")
    elif bad == 7:
        invalid("precision", f, q, k, sigma=1.0, precision="hihgest")
    elif bad == 8:
        invalid("log_weights", f, q, k, sigma=1.0, log_weights=torch.zeros(3, dtype=dtype))
    else:
        invalid("queries", f, torch.zeros(3, dtype=dtype), k, sigma=1.0)


@st.composite
def langevin_case(draw):
    shape = draw(shapes(min_rank=1, max_rank=3))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    x = draw(tensors(shape, dtype, values=draw(st.sampled_from(["normal", "normal", "tiny", "zero", "nan"]))))
    m = draw(tensors(shape, dtype, values="normal"))
    a, b = draw(finite_floats(-2, 2)), draw(st.sampled_from([1.0, -0.5, 0.0]))
    snr, alpha_i = draw(finite_floats(0, 1)), draw(finite_floats(0, 2))
    return x, m, (a, b), snr, alpha_i, draw(st.sampled_from(["sample", "batch"])), draw(st.booleans()), \
        draw(st.integers(0, 2**62))


@fuzz(700)
@given(langevin_case())
def test_langevin_update_matches_reference(case):
    x, m, cf, snr, alpha_i, norm, supplied, seed = case
    kw = {"noise": make_values(x.shape, x.dtype, seed % 2**31)} if supplied else {"seed": seed, "offset": 3}
    out = valid(ops.langevin_update, x, m, cf, snr=snr, alpha_i=alpha_i, norm=norm, **kw)
    ref = valid(ops.langevin_update, x, m, cf, snr=snr, alpha_i=alpha_i, norm=norm, backend="torch", **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    rtol, atol = TOL[x.dtype]
    close(out, ref, max(rtol, 1e-5) if x.dtype != torch.float64 else 1e-10, max(atol, 1e-6), "langevin kernel vs reference")


@fuzz(400)
@given(bad=st.integers(0, 7), shape=shapes(min_batch=1, max_rank=3))
def test_langevin_update_rejects_invalid(bad, shape):
    x = torch.ones(shape)
    f = ops.langevin_update
    if bad == 0:
        invalid("snr", f, x, x, snr=-0.1, seed=0)
    elif bad == 1:
        invalid("snr", f, x, x, snr=float("nan"), seed=0)
    elif bad == 2:
        invalid("alpha_i", f, x, x, snr=0.1, alpha_i=float("inf"), seed=0)
    elif bad == 3:
        invalid("norm", f, x, x, snr=0.1, norm="samples", seed=0)
    elif bad == 4:
        invalid(("noise", "seed"), f, x, x, snr=0.1)
    elif bad == 5:
        invalid("model_out", f, x, x.double(), snr=0.1, seed=0)
    elif bad == 6:
        invalid("coefs", f, x, x, (1.0,), snr=0.1, seed=0)
    else:
        invalid("x", f, x.long(), x.long(), snr=0.1, seed=0)


@fuzz(300)
@given(shape=shapes(min_batch=1, max_rank=3), dtype=st.sampled_from(FLOAT_DTYPES), layout=st.sampled_from(LAYOUTS),
       values=st.sampled_from(VALUES))
def test_raw_ops_agree_with_wrappers(shape, dtype, layout, values):
    """torch.ops.genflow.* called directly with packed arguments equal the wrappers' results."""
    x = with_layout(make_values(shape, dtype, 7, values), layout)
    coef = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    raw = valid(torch.ops.genflow.fused_update, x, [x], coef, None, None, 0)
    close(raw, ops.fused_update(x, [x], [0.5, -1.0]), 0, 0, "raw fused_update")
    scale = torch.ones(1, dtype=torch.float64)
    raw_dot = valid(torch.ops.genflow.probe_dot, x, x, scale, None)
    close(raw_dot, ops.probe_dot(x, x), 0, 0, "raw probe_dot")
    invalid(("coef", "x"), torch.ops.genflow.fused_update, x, [x], coef[:1], None, None, 0)
    invalid(("v", "probe"), torch.ops.genflow.probe_dot, x, x[:, None], scale, None)
