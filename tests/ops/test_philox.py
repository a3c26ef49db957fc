"""The Philox4x32-10 normal stream: known answers, kernel == reference bitwise, accuracy of the
float32 approximations, statistics and independence of streams."""
import math

import pytest
import torch

from genflow._extension import HAS_EXTENSION, has_cuda_kernels
from genflow.ops import _reference as R
from genflow.ops import randn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_cuda_kernels() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
needs_ext = pytest.mark.skipif(not HAS_EXTENSION, reason="genflow._C is not built")


# ---------------------------------------------------------------- Philox known answers

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = R.philox4x32_10(counter, key)
    assert tuple(int(w) for w in out) == expected


def test_philox_mulhilo_limbs_match_python_ints():
    gen = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2**32, (10_000,), generator=gen, dtype=torch.int64)
    c[:4] = torch.tensor([0, 1, 2**32 - 1, 2**31])
    for m in (0xD2511F53, 0xCD9E8D57):
        hi, lo = R._mulhilo(m, c)
        for v, h, l in zip(c[:200].tolist(), hi[:200].tolist(), lo[:200].tolist()):
            assert (h, l) == ((m * v) >> 32, (m * v) & 0xFFFFFFFF)


def test_stream_definition_by_hand():
    """N(seed, offset)[n]: counter (n >> 2, offset), key = seed, lane n & 3, Box-Muller pairs."""
    seed, offset = 0x0123456789ABCDEF, 5
    z = R.normal_stream(seed, offset, 12)
    for n in (0, 1, 2, 3, 9, 11):
        w = R.philox4x32_10((n >> 2, 0, offset, 0), (seed & 0xFFFFFFFF, seed >> 32))
        pair = (w[0], w[1]) if (n & 3) < 2 else (w[2], w[3])
        wa, wb = int(pair[0]), int(pair[1])
        u = float(torch.tensor(float(wa), dtype=torch.float32)) * 2.0**-32 + 2.0**-33
        theta = 2 * math.pi * float(torch.tensor(float(wb), dtype=torch.float32)) * 2.0**-32
        r = math.sqrt(-2 * math.log(u))
        expect = r * (math.cos(theta) if n % 2 == 0 else math.sin(theta))
        assert abs(float(z[n]) - expect) <= 4e-7 * max(1.0, abs(expect))


# ---------------------------------------------------------------- kernel == reference, bitwise

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 341), (65537,), (2, 3, 5, 7)])
def test_kernel_stream_equals_reference(device, dtype, shape):
    for seed, offset in ((0, 0), (-1, 3), (2**63 + 12345, 2**40 + 7)):
        a = randn(shape, seed=seed, offset=offset, dtype=dtype, device=device)
        b = randn(shape, seed=seed, offset=offset, dtype=dtype, device=device, backend="torch")
        assert a.dtype == dtype and a.shape == shape and a.device.type == device
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample", [1, 2, 5, 7, 1000])
def test_kernel_per_sample_stream_equals_reference(device, per_sample):
    seeds = torch.tensor([0, 1, -5, 2**62, 17, 17], dtype=torch.int64)
    a = randn((6, per_sample), seed=seeds, offset=9, device=device)
    b = randn((6, per_sample), seed=seeds, offset=9, device=device, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_per_sample_seed_equals_batch_of_one(backend):
    if backend == "auto" and not HAS_EXTENSION:
        pytest.skip("genflow._C is not built")
    seeds = [11, 22, 33, 44, 55, 66, 77, 88]
    batch = randn((8, 3, 5), seed=seeds, offset=4, backend=backend)
    for i, s in enumerate(seeds):
        alone = randn((1, 3, 5), seed=s, offset=4, backend=backend)
        assert torch.equal(batch[i], alone[0])
    # and with one seed, the stream runs over the flat index
    flat = randn((8 * 15,), seed=11, offset=4, backend=backend)
    assert torch.equal(randn((8, 3, 5), seed=11, offset=4, backend=backend).reshape(-1), flat)


def test_seed_is_64_bit_twos_complement():
    assert torch.equal(randn(10, seed=-1, backend="torch"), randn(10, seed=2**64 - 1, backend="torch"))
    a = randn(10, seed=torch.tensor([2**40 + 3]), backend="torch")
    assert torch.equal(a, randn(10, seed=2**40 + 3, backend="torch"))


@needs_ext
def test_stream_is_thread_count_independent():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = randn((3, 400_003), seed=7, offset=1)
        b = randn((3, 400_003), seed=[1, 2, 3], offset=1)
        torch.set_num_threads(2)
        assert torch.equal(a, randn((3, 400_003), seed=7, offset=1))
        assert torch.equal(b, randn((3, 400_003), seed=[1, 2, 3], offset=1))
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- accuracy of the approximations

def _ulp32(ref: torch.Tensor) -> torch.Tensor:
    """float32 ulp at |ref| (float64), floored at the ulp of the smallest normal."""
    mag = ref.abs().clamp_min(2.0**-126)
    return torch.ldexp(torch.ones_like(mag), torch.floor(torch.log2(mag)).to(torch.int64) - 23)


def test_log_approx_within_one_ulp():
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(0, 2**32, (1 << 20,), generator=gen, dtype=torch.int64)
    u = R._fma32(w.double().float(), 2.0**-32, 2.0**-33)  # the Box-Muller inputs
    u = torch.cat([u, torch.tensor([2.0**-33, 0.5, 0.70710677, 0.7071068, 1 - 2.0**-24, 0.999], dtype=torch.float32)])
    got = R.log_approx(u).double()
    ref = torch.log(u.double())
    err = ((got - ref).abs() / _ulp32(ref))[u != 1]
    assert err.max().item() <= 1.0
    assert R.log_approx(torch.tensor([1.0])).item() == 0.0


def test_sincos_2pi_approx_within_two_ulp():
    gen = torch.Generator().manual_seed(2)
    w = torch.randint(0, 2**32, (1 << 20,), generator=gen, dtype=torch.int64)
    t = R._mul32(w.double().float(), 2.0**-32)
    t = torch.cat([t, torch.tensor([0.0, 2.0**-32, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0 - 2.0**-24, 1.0])])
    c, s = R.sincos_2pi_approx(t)
    # reference on the exactly reduced argument (sin(2 pi t) in float64 loses the zeros)
    q = torch.round(4 * t.double())
    r = 2 * math.pi * (t.double() - q / 4)
    quadrant = q.to(torch.int64) % 4
    C, S = torch.cos(r), torch.sin(r)
    cos = torch.where(quadrant == 0, C, torch.where(quadrant == 1, -S, torch.where(quadrant == 2, -C, S)))
    sin = torch.where(quadrant == 0, S, torch.where(quadrant == 1, C, torch.where(quadrant == 2, -S, -C)))
    for got, ref in ((c, cos), (s, sin)):
        err = (got.double() - ref).abs()
        assert (err / _ulp32(ref)).max().item() <= 2.0
        assert err.max().item() <= 2.0**-23
    assert (c.double() ** 2 + s.double() ** 2 - 1).abs().max().item() < 3e-7


def test_sqrt_approx_within_one_ulp():
    gen = torch.Generator().manual_seed(3)
    v = torch.cat([torch.rand(1 << 20, generator=gen) * 46, torch.rand(1 << 16, generator=gen) * 1e-6,
                   torch.tensor([0.0, -0.0, 1e-7, 1.0, 2.0, 4.0, 45.9])])
    got = R.sqrt_approx(v).double()
    ref = torch.sqrt(v.double().abs())
    assert ((got - ref).abs() / _ulp32(ref)).max().item() <= 1.0
    assert got[v == 0].abs().max().item() == 0.0


def test_normals_close_to_exact_box_muller():
    n = 1 << 18
    z = R.normal_stream(99, 0, n).double()
    g = torch.arange(n // 4, dtype=torch.int64)
    w = R.philox4x32_10((g, torch.zeros_like(g), 0, 0), (99, 0))
    exact, radius = [], []
    for wa, wb in ((w[0], w[1]), (w[2], w[3])):
        u = R._fma32(wa.double().float(), 2.0**-32, 2.0**-33).double()
        t = R._mul32(wb.double().float(), 2.0**-32).double()
        r = torch.sqrt(-2 * torch.log(u))
        exact += [r * torch.cos(2 * math.pi * t), r * torch.sin(2 * math.pi * t)]
        radius += [r, r]
    exact = torch.stack(exact, dim=-1).reshape(-1)
    radius = torch.stack(radius, dim=-1).reshape(-1)
    # r within ~1.5 ulp, cos/sin within 2 ulp (2^-23 absolute near their zeros), one rounding
    err = (z - exact).abs()
    assert (err <= 4 * _ulp32(exact) + radius * 2.0**-22).all()


# ---------------------------------------------------------------- statistics (bounds from standard errors)

def _stream(n, seed, offset=0):
    return randn(n, seed=seed, offset=offset, dtype=torch.float64,
                 backend="auto" if HAS_EXTENSION else "torch")


def test_moments_and_distribution():
    n = 4_000_000
    z = _stream(n, 2024)
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15) * se  # skewness; var(z^3) = 15
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96) * se  # kurtosis; var(z^4) = 96
    # Kolmogorov-Smirnov against the normal CDF (critical value at 0.1%: 1.95 / sqrt(n))
    zs, _ = torch.sort(z)
    cdf = torch.special.ndtr(zs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert d < 1.95 * se
    # tails: P(|z| > 3) = 0.0026998, binomial standard error
    p3 = 0.0026997960632601866
    frac = (z.abs() > 3).double().mean().item()
    assert abs(frac - p3) < 5 * math.sqrt(p3 * (1 - p3) / n)


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 8, 64])
def test_no_lag_correlation(lag):
    n = 2_000_000
    z = _stream(n + lag, 31337)
    corr = (z[:-lag] * z[lag:]).mean().item()
    assert abs(corr) < 5 / math.sqrt(n)
    # squares too (Box-Muller pairs share a radius; they must still be uncorrelated in z^2)
    corr2 = ((z[:-lag] ** 2 - 1) * (z[lag:] ** 2 - 1)).mean().item() / 2
    assert abs(corr2) < 5 * math.sqrt(4) / math.sqrt(n)


@pytest.mark.parametrize("other", [("seed", 1), ("offset", 1), ("seed", -1), ("offset", 2**32)])
def test_streams_independent(other):
    n = 1_000_000
    a = _stream(n, 5, 0)
    b = _stream(n, 5 + other[1], 0) if other[0] == "seed" else _stream(n, 5, other[1])
    assert not torch.equal(a, b)
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n)
    assert (a == b).double().mean().item() < 1e-4


def test_per_sample_streams_independent():
    seeds = list(range(100, 108))
    z = randn((8, 250_000), seed=seeds, dtype=torch.float64, backend="auto" if HAS_EXTENSION else "torch")
    corr = torch.corrcoef(z)
    off = corr - torch.diag(torch.diag(corr))
    assert off.abs().max().item() < 5 / math.sqrt(250_000)
