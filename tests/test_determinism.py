"""Determinism (issue 8; README "Determinism"): the same seed, device and backend give bitwise
identical results across runs, thread counts and processes, and with per-sample seeds a sample
does not depend on the batch it is in.

Every case runs twice with 2 threads and once with 1 (``_runs``); one test repeats a few cases in
a fresh process with ``OMP_NUM_THREADS=1``. Sizes exceed the CPU kernels' parallel grain (32768
elements for the fused update, probes, Langevin step and PyTorch's own elementwise ops; 65536
query-key pairs for the kernel mean), so two threads really split the work (except the
small sde_adaptive and Hutchinson cases, whose cost is per-sample host work). The models are exact
Gaussian mixtures with isotropic components: no matmul whose blocking could depend on threads.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import genflow as gf
from genflow import ops
from genflow.train import TrainConfig, train
from genflow.train.data import Dataset
from genflow.train.families import make_family

needs_ext = pytest.mark.skipif(not gf.HAS_EXTENSION, reason="needs the compiled extension genflow._C")

SHAPE = (11000, 3)  # 33000 elements: two chunks of the 32768-element parallel grain
MIXTURE = gf.GaussianMixture(torch.tensor([[2.0, 0.0, -1.0], [-1.0, 2.0, 0.5], [0.0, -2.0, 1.0]]), 0.5)
MODEL = MIXTURE.model(gf.VP())


def _flat(result):
    return list(result) if isinstance(result, (list, tuple)) else [result]


def _runs(fn):
    """``fn()`` twice with 2 threads, then once with 1 (the caller's thread count restored)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        results = [fn(), fn()]
        torch.set_num_threads(1)
        results.append(fn())
    finally:
        torch.set_num_threads(threads)
    return results


def _assert_identical(results):
    first = _flat(results[0])
    for t in first:
        assert torch.isfinite(t).all(), "NaN or Inf in the result"
    for other in results[1:]:
        other = _flat(other)
        assert len(other) == len(first)
        for a, b in zip(first, other):
            assert torch.equal(a, b), f"differs in {int((a != b).sum())} of {a.numel()} elements"


# ---------------------------------------------------------------- gf.sample

SAMPLE_CASES = [  # (solver, options, backends): the reference backend on a subset, to save time
    ("dpmpp_2m", {}, ("cpu", "torch")),
    ("euler_maruyama", {}, ("cpu", "torch")),
    ("euler_ancestral", {}, ("cpu",)),
    ("dpmpp_2m_sde", {}, ("cpu",)),
    ("pc", {}, ("cpu", "torch")),  # predictor + Langevin corrector (batch-mean norms)
    ("ald", {}, ("cpu",)),
    ("euler_maruyama", {"noise": "brownian_tree"}, ("cpu", "torch")),
    ("euler_maruyama", {"generator": list(range(SHAPE[0]))}, ("cpu", "torch")),
]


@pytest.mark.parametrize("solver, options, backend", [
    pytest.param(solver, options, backend, marks=needs_ext if backend == "cpu" else (),
                 id="-".join([solver, *sorted(options), backend]))
    for solver, options, backends in SAMPLE_CASES for backend in backends])
def test_sample_fixed_grid(solver, options, backend):
    options = {"generator": 7, **options}
    _assert_identical(_runs(lambda: gf.sample(MODEL, SHAPE, solver=solver, steps=2, backend=backend, **options)))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "torch"])
def test_sample_rk45(backend):
    """Per-sample adaptive step sizes: the accept/reject decisions must repeat exactly too."""
    _assert_identical(_runs(lambda: gf.sample(MODEL, SHAPE, solver="rk45", t_start=0.3, t_end=0.1, rtol=2e-2,
                                              atol=2e-2, generator=3, backend=backend)))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "torch"])
def test_sample_sde_adaptive(backend):
    """Brownian-tree noise (the solver's default) with per-sample step sizes (a small batch: the
    tree's per-sample bookkeeping is host work)."""
    _assert_identical(_runs(lambda: gf.sample(MODEL, (512, 3), solver="sde_adaptive", t_start=0.3, t_end=0.1,
                                              generator=3, backend=backend)))


PER_SAMPLE_CASES = [
    ("euler_maruyama", {}, ("cpu", "torch")),
    ("pc", {"norm": "sample"}, ("cpu",)),
    ("dpmpp_2m_sde", {"noise": "brownian_tree"}, ("cpu", "torch")),
    ("rk45", {"t_start": 0.3, "t_end": 0.1, "rtol": 1e-2, "atol": 1e-2}, ("cpu", "torch")),
]


@pytest.mark.parametrize("solver, options, backend", [
    pytest.param(solver, options, backend, marks=needs_ext if backend == "cpu" else (), id=f"{solver}-{backend}")
    for solver, options, backends in PER_SAMPLE_CASES for backend in backends])
def test_per_sample_seeds_bitwise_independent_of_the_batch(solver, options, backend):
    """Sample i with seed s_i is the same bits alone, in a batch of 8 and in a batch of 11000
    (split across threads), wherever it sits."""
    n = SHAPE[0]
    seeds = [11 * i + 5 for i in range(n)]
    common = dict(solver=solver, steps=3, backend=backend, **options)
    big = gf.sample(MODEL, SHAPE, generator=seeds, **common)
    small = gf.sample(MODEL, (8, 3), generator=seeds[n - 8:], **common)
    assert torch.isfinite(big).all()
    for i in (0, 3, 7):
        alone = gf.sample(MODEL, (1, 3), generator=[seeds[n - 8 + i]], **common)
        assert torch.equal(small[i:i + 1], alone)
        assert torch.equal(big[n - 8 + i:n - 7 + i], alone)


# ---------------------------------------------------------------- genflow.ops

@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "torch"])
@pytest.mark.parametrize("seed", [5, list(range(3))], ids=["one_seed", "per_sample_seeds"])
def test_fused_update(seed, backend):
    g = torch.Generator().manual_seed(0)
    x, t1, t2 = (torch.randn(3, 40000, generator=g) for _ in range(3))
    coefs = [0.9, torch.rand(3, generator=g, dtype=torch.float64), -0.3]
    _assert_identical(_runs(lambda: ops.fused_update(x, [t1, t2], coefs, 0.5, seed=seed, offset=4, backend=backend)))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "torch"])
def test_philox_probes_and_probe_dot(backend):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(8, 16384, generator=g)

    def run():
        rademacher = ops.probes(v.shape, seed=3, offset=2, backend=backend)
        gaussian = ops.probes(v.shape, seed=list(range(8)), kind="gaussian", backend=backend)
        z = ops.randn(v.shape, seed=9, backend=backend)
        return [rademacher, gaussian, z, ops.probe_dot(gaussian, v, scale=0.5, backend=backend)]

    _assert_identical(_runs(run))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "torch"])
@pytest.mark.parametrize("norm", ["sample", "batch"])
def test_langevin_update(norm, backend):
    g = torch.Generator().manual_seed(2)
    x, score = torch.randn(8, 16384, generator=g), torch.randn(8, 16384, generator=g)
    _assert_identical(_runs(lambda: ops.langevin_update(x, score, (-0.5, 1.0), snr=0.16, norm=norm, seed=4,
                                                        backend=backend)))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "torch"])
@pytest.mark.parametrize("d, dv", [(2, 3), (7, 7)])
def test_kernel_weighted_mean_forward_and_backward(d, dv, backend):
    """1024 x 1024 pairs: 64 query tiles (forward, dq) and 4 key tiles (dk, dv) over the threads."""
    g = torch.Generator().manual_seed(d)
    q, k, v = torch.randn(1024, d, generator=g), torch.randn(1024, d, generator=g), torch.randn(1024, dv, generator=g)
    lw = torch.randn(1024, generator=g)
    w = torch.randn(1024, dv, generator=g)

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = gf.kernel_weighted_mean(*leaves, sigma=0.4, log_weights=lw, return_lse=True, backend=backend)
        (out * w).sum().backward()
        return [out.detach(), lse] + [t.grad for t in leaves]

    _assert_identical(_runs(run))


# ---------------------------------------------------------------- likelihoods and kernel flows

@pytest.mark.parametrize("method, n, options", [
    ("exact", SHAPE[0], {"solver": "heun", "steps": 2}),
    ("hutchinson", 512, {"generator": 5, "probes": 2, "rtol": 1e-2, "atol": 1e-2}),
], ids=["exact-heun", "hutchinson-rk45"])
def test_log_likelihood(method, n, options):
    x = MIXTURE.sample(n, generator=torch.Generator().manual_seed(2)).float()
    _assert_identical(_runs(lambda: gf.log_likelihood(MODEL, x, method=method, **options)))


def test_kernel_flows():
    g = torch.Generator().manual_seed(4)
    source, target = torch.randn(2048, 2, generator=g), torch.randn(2048, 2, generator=g) + 1.0

    def run():
        return [gf.sd_flow(source, target, sigma=0.5, steps=3, step_size=0.1, target_batch=1024, generator=3),
                gf.mmd_flow(source, target, sigma=0.5, steps=3, step_size=0.1, noise_level=0.1, generator=3),
                gf.svgd(source, lambda y: -y, steps=3, step_size=0.1, generator=3)]

    _assert_identical(_runs(run))


# ---------------------------------------------------------------- training

def test_trainer_same_seed_same_loss_curve_and_weights():
    """Same seed, same thread count: the same loss curve and weights. (Across thread counts the
    user's network and PyTorch's batch reductions decide; genflow does not promise it.)"""
    data = Dataset(MIXTURE.sample(2048, generator=torch.Generator().manual_seed(0)).float())
    config = TrainConfig(steps=6, batch_size=256, lr=1e-2, warmup=2, seed=3, log_every=0)

    def run():
        torch.manual_seed(0)
        family = make_family("flow-matching", data_shape=(3,), net_options=dict(hidden=32, layers=2))
        result = train(family, data, config, progress=False)
        return [result.losses["main"]] + [p.detach().clone() for p in family.modules.parameters()]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = run(), run()
    finally:
        torch.set_num_threads(threads)
    _assert_identical([first, second])


# ---------------------------------------------------------------- a fresh process, one thread

_CHILD = textwrap.dedent("""
    import sys, torch
    from tests.test_determinism import fresh_process_cases
    torch.save(fresh_process_cases(), sys.argv[1])
""")


def fresh_process_cases():
    """A few results recomputed in a fresh process with OMP_NUM_THREADS=1."""
    backend = "cpu" if gf.HAS_EXTENSION else "torch"
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1024, 2, generator=g), torch.randn(1024, 2, generator=g)
    return [gf.sample(MODEL, SHAPE, solver="dpmpp_2m_sde", steps=3, generator=1, backend=backend),
            gf.sample(MODEL, SHAPE, solver="euler_maruyama", steps=3, generator=1, backend="torch"),
            gf.kernel_weighted_mean(q, k, sigma=0.3, backend=backend)]


def test_fresh_process_with_one_omp_thread(tmp_path):
    path = tmp_path / "child.pt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", _CHILD, str(path)], cwd=root, env=env, check=True, timeout=120)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        here = fresh_process_cases()
    finally:
        torch.set_num_threads(threads)
    _assert_identical([here, torch.load(path)])


# ---------------------------------------------------------------- across backends

@needs_ext
@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_2m_sde", "pc", "rk45"])
def test_cpu_kernel_and_torch_reference_agree_bitwise_in_float32(solver):
    """Float32 state: the fused kernels and their PyTorch twins round the same explicit fmas, so a
    whole solve is the same bits on backend="cpu" and backend="torch" (float64 agrees to ~1e-14)."""
    options = dict(t_start=0.3, t_end=0.1, rtol=1e-2, atol=1e-2) if solver == "rk45" else {}
    kernel, reference = (gf.sample(MODEL, (1000, 3), solver=solver, steps=5, generator=1, backend=backend, **options)
                         for backend in ("cpu", "torch"))
    _assert_identical([kernel, reference])
