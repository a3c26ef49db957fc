"""The fused update's divergence flag (``nonfinite``, ``step`` of ``genflow::fused_update_out``:
min-of-steps semantics, outputs bitwise unchanged, every kernel path) and its bad-input handling
(flag arguments, overlapping and non-contiguous memory, empty and zero-size inputs, integer and
bool tensors)."""
import math

import pytest
import torch

from genflow._extension import HAS_EXTENSION, has_cuda_kernels
from genflow.ops.fused_update import fused_update, fused_update_unchecked, seed_tensor

G = torch.ops.genflow if HAS_EXTENSION else None
needs_ext = pytest.mark.skipif(not HAS_EXTENSION, reason="genflow._C is not built")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_cuda_kernels() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NONE = 2**31 - 1  # the flag's value while nothing was recorded


def _flag(device, value=NONE):
    return torch.full((1,), value, dtype=torch.int32, device=device)


def _inputs(shape, dtype, device, K, bad=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    terms = [torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(K)]
    if bad is not None:
        (terms[0] if K else x).view(-1)[bad] = math.nan
    return x, terms


# (K, per-sample coefficients, noise): the block path, the small-sample path, generated and supplied noise
PATHS = [(0, False, None), (1, False, "seed"), (2, True, None), (3, True, "noise"), (4, False, "per_sample_seed")]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K, per_sample, noise", PATHS)
@pytest.mark.parametrize("shape", [(3, 5), (4, 16), (2, 40_001)])
def test_flag_records_the_step_and_leaves_outputs_unchanged(device, dtype, K, per_sample, noise, shape):
    B, numel = shape[0], shape[0] * shape[1]
    for bad in (None, numel - 1) if numel > 100 else (None, 0, numel - 1, numel // 2 + 1):
        x, terms = _inputs(shape, dtype, device, K, bad)
        values = [torch.linspace(0.5, 1.5, B, dtype=torch.float64) if per_sample else 0.75]
        values += [0.25 * (k + 1) for k in range(K)] + [0.5 if noise else 0.0]
        kwargs = {}
        if noise == "noise":
            kwargs["noise"] = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
        elif noise is not None:
            kwargs["seed"] = seed_tensor(3 if noise == "seed" else list(range(B)), B, torch.device(device))
        plain = fused_update_unchecked(x, terms, values, kernel=True, **kwargs)
        for inplace in (False, True):
            flag = _flag(device)
            out = x.clone() if inplace else torch.empty_like(x)
            got = fused_update_unchecked(out if inplace else x, terms, values, kernel=True, out=out, nonfinite=flag,
                                         step=7, **kwargs)
            assert torch.equal(got.view(torch.uint8), plain.view(torch.uint8)), (bad, inplace)
            assert int(flag) == (NONE if bad is None else 7), (bad, inplace)
            if numel <= 100:  # the reference path records the same
                torch_flag = _flag(device)
                fused_update_unchecked(x, terms, values, kernel=False, nonfinite=torch_flag, step=7, **kwargs)
                assert int(torch_flag) == int(flag)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_flag_keeps_the_smallest_step_and_sees_overflow(device):
    x, _ = _inputs((4, 100), torch.float32, device, 0, bad=13)
    coef = torch.tensor([1.0, 0.0], dtype=torch.float64)
    flag = _flag(device, 3)
    G.fused_update_out(x, [], coef, None, None, 0, torch.empty_like(x), flag, 5)
    assert int(flag) == 3
    G.fused_update_out(x, [], coef, None, None, 0, torch.empty_like(x), flag, 1)
    assert int(flag) == 1
    big = torch.full((2, 8), 60000.0, dtype=torch.float16, device=device)  # finite inputs, result overflows
    flag = _flag(device)
    G.fused_update_out(big, [], torch.tensor([2.0, 0.0], dtype=torch.float64), None, None, 0, torch.empty_like(big),
                       flag, 0)
    assert int(flag) == 0
    nan = torch.full((3,), math.nan, device=device)  # zero-dim-batch and functional-with-grad paths
    flag = _flag(device)
    fused_update_unchecked(nan.requires_grad_(), [], [1.0, 0.0], kernel=True, nonfinite=flag, step=2)
    assert int(flag) == 2


@needs_ext
def test_flag_grouped_host_loop_is_untouched():
    """The CUDA group loop run on the host returns the same bits with NaNs present."""
    x, terms = _inputs((3, 37), torch.float32, "cpu", 2, bad=40)
    coef = torch.tensor([1.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    grouped = G._fused_update_grouped(x, terms, coef, None, None, 0, False)
    flagged = torch.empty_like(x)
    G.fused_update_out(x, terms, coef, None, None, 0, flagged, _flag("cpu"), 0)
    assert torch.equal(grouped.view(torch.int32), flagged.view(torch.int32))


@needs_ext
@pytest.mark.parametrize("flag, step, match", [
    (torch.zeros(1, dtype=torch.int64), 0, "nonfinite must be Int, got Long"),
    (torch.zeros(1), 0, "nonfinite must be Int, got Float"),
    (torch.zeros(2, dtype=torch.int32), 0, r"nonfinite must have shape \[1\] \(one int32 flag\), got \[2\]"),
    (torch.zeros((), dtype=torch.int32), 0, r"nonfinite must have shape \[1\] .*got \[\]"),
    (torch.zeros(1, dtype=torch.int32), -1, r"step must be in \[0, 2\^31\), got -1"),
    (torch.zeros(1, dtype=torch.int32), 2**31, r"step must be in \[0, 2\^31\), got 2147483648"),
])
def test_flag_arguments_rejected(flag, step, match):
    x = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match=match):
        G.fused_update_out(x, [], torch.tensor([1.0, 0.0], dtype=torch.float64), None, None, 0, torch.empty_like(x),
                           flag, step)


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_EXTENSION and has_cuda_kernels()), reason="needs CUDA")
def test_flag_on_another_device_rejected():
    x = torch.ones(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="nonfinite must be on cuda:0, got cpu"):
        G.fused_update_out(x, [], torch.tensor([1.0, 0.0], dtype=torch.float64), None, None, 0, torch.empty_like(x),
                           _flag("cpu"), 0)


# ---------------------------------------------------------------- memory layouts and sizes

@needs_ext
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_expanded_and_strided_inputs_are_read_correctly(backend):
    row = torch.arange(6.0).reshape(1, 6)
    x = row.expand(4, 6)  # stride 0 over the batch
    t = torch.arange(48.0).reshape(4, 12)[:, ::2]  # strided
    expect = 2 * x + 0.5 * t
    assert torch.equal(fused_update(x, [t], [2.0, 0.5], backend=backend), expect)


@needs_ext
def test_overlapping_outputs_rejected_with_names():
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"out must not have overlapping memory .*expand.*got shape \[4, 6\] "
                                           r"with strides \[0, 1\]"):
        G.fused_update_out(x, [], torch.tensor([1.0, 0.0], dtype=torch.float64), None, None, 0,
                           torch.zeros(1, 6).expand(4, 6))
    buf = torch.randn(30)
    t, out = buf[:24].view(4, 6), buf[6:30].view(4, 6)
    with pytest.raises(RuntimeError, match=r"out must be terms\[0\] itself or not overlap it in memory"):
        G.fused_update_out(x, [t], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), None, None, 0, out)
    with pytest.raises(RuntimeError, match=r"out must be noise itself or not overlap it"):
        G.fused_update_out(x, [], torch.tensor([1.0, 1.0], dtype=torch.float64), t, None, 0, out)
    with pytest.raises(RuntimeError, match=r"out must not have overlapping memory"):
        G.philox_normal_out(torch.tensor([1]), 0, torch.zeros(1, 6).expand(4, 6))


@needs_ext
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
def test_empty_and_zero_size_inputs(shape):
    x = torch.empty(shape)
    flag = _flag("cpu")
    out = torch.empty(shape)
    G.fused_update_out(x, [x], torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), None, torch.tensor([1]), 0, out,
                       flag, 0)
    assert int(flag) == NONE
    assert fused_update(x, [x], [1.0, 2.0], 1.0, seed=1).shape == shape


@needs_ext
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_and_bool_states_rejected(dtype):
    bad = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(TypeError, match=f"x must be float32, float64, bfloat16 or float16, got {dtype}"):
        fused_update(bad, [], [1.0])
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16, got"):
        G.fused_update_out(bad, [], torch.tensor([1.0, 0.0], dtype=torch.float64), None, None, 0, bad)
    with pytest.raises(TypeError, match=f"terms\\[0\\] must have x's dtype torch.float32, got {dtype}"):
        fused_update(torch.ones(2, 3), [bad], [1.0, 1.0])
