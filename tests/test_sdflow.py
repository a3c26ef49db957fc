"""Kernel SD flow, MMD flow, SVGD and SD-flow generator training (genflow.sdflow, genflow.kernel_flows).

Oracles are dense float64 implementations of the same updates (N x M matrices, fine at test
sizes); convergence is measured with the unbiased MMD^2 of ``genflow.metrics.mmd`` against the
spread of the same statistic between independent target draws.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from genflow.kernel_flows import (median_bandwidth, mmd_flow, mmd_velocity, score_from_log_prob, svgd,
                                  svgd_direction)
from genflow.metrics import mmd
from genflow.mixtures import GaussianMixture
from genflow.sdflow import MLPGenerator, sd_flow, sigma_sequence, train_sd_generator

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def swiss_roll(n, g):
    """2-D swiss roll (scaled to about [-4, 4]^2) with noise 0.1."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=F64))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 3
    return x + 0.1 * torch.randn(n, 2, generator=g, dtype=F64)


def dense_mean(z, keys, values, sigma):
    w = torch.softmax(-torch.cdist(z, keys).square() / (2 * sigma * sigma), dim=1)
    return w @ values


def dense_sd_flow(source, target, sigmas, sizes, seed, identity=False):
    """Weber's SD-flow update in float64 with the generator consumed as sd_flow documents (noise
    drawn in the source's dtype)."""
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, 1 << 62, (1,), generator=g)  # the target-subset stream's seed
    y = source.to(F64)
    for s, h in zip(sigmas, sizes):
        z = y + s * torch.randn(y.shape, generator=g, dtype=source.dtype).to(F64)
        d_q = y if identity else dense_mean(z, y, y, s)
        y = y + h / (s * s) * (dense_mean(z, target, target, s) - d_q)
    return y


def spread(target, draw, k=3):
    """The largest |MMD^2| between the target and k independent draws of the same law."""
    return max(abs(mmd(draw(), target)) for _ in range(k))


# ------------------------------------------------------------------------------- SD flow


@pytest.mark.parametrize("schedule,identity", [("constant", False), ("geometric", False), ("cosine", True),
                                               ("linear", False), ("sequence", False), ("callable", True)])
def test_sd_flow_matches_dense(schedule, identity):
    g = torch.Generator().manual_seed(3)
    source, target = torch.randn(7, 3, generator=g, dtype=F64), 2 + torch.randn(11, 3, generator=g, dtype=F64)
    steps = 4
    if schedule == "sequence":
        arg = [0.9, 0.7, 0.8, 0.5]
    elif schedule == "callable":
        arg = lambda k: 1.0 / (k + 1)  # noqa: E731
    else:
        arg = schedule
    sigmas = sigma_sequence(arg, sigma=0.9, sigma_min=0.3, steps=steps)
    sizes = [0.3 * s * s for s in sigmas]
    out = sd_flow(source, target, sigma=0.9, steps=steps, step_size=sizes, sigma_schedule=arg, sigma_min=0.3,
                  denoiser_q="identity" if identity else "kernel", generator=11)
    want = dense_sd_flow(source, target, sigmas, sizes, 11, identity)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, source)


def test_sigma_sequence_values():
    assert sigma_sequence("constant", sigma=0.5, steps=3) == [0.5] * 3
    lin = sigma_sequence("linear", sigma=1.0, sigma_min=0.2, steps=5)
    assert lin == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    geo = sigma_sequence("geometric", sigma=1.0, sigma_min=0.01, steps=3)
    assert geo == pytest.approx([1.0, 0.1, 0.01])
    cos = sigma_sequence("cosine", sigma=1.0, sigma_min=0.2, steps=3)
    assert cos == pytest.approx([1.0, 0.6, 0.2])
    assert sigma_sequence("geometric", sigma=1.0, sigma_min=0.1, steps=1) == [1.0]


def test_sd_flow_float32_and_trajectory():
    g = torch.Generator().manual_seed(0)
    source, target = torch.randn(20, 2, generator=g), torch.randn(30, 2, generator=g) + 3
    y, traj = sd_flow(source, target, sigma=0.8, steps=5, step_size=0.3, generator=1, return_trajectory=True)
    assert y.dtype == torch.float32 and traj.shape == (6, 20, 2)
    torch.testing.assert_close(traj[0], source)
    torch.testing.assert_close(traj[-1], y)
    want = dense_sd_flow(source, target.double(), [0.8] * 5, [0.3] * 5, 1).float()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sd_flow(source, target, sigma=0.8, steps=5, step_size=0.3, generator=1), y)


def test_sd_flow_brings_ring_to_swiss_roll():
    """8 Gaussians -> swiss roll, N = M = 500, 20 steps (cosine schedule 1.0 -> 0.3, h = sigma^2 / 2).

    Measured (2-core CPU): MMD^2 from 0.20 to about 0.006; three independent target draws are
    within about 0.005 of the target sample.
    """
    g = torch.Generator().manual_seed(0)
    target = swiss_roll(500, g)
    source = GaussianMixture.ring(8, 4.0, 0.5).sample(500, generator=g, dtype=F64)
    sigmas = sigma_sequence("cosine", sigma=1.0, sigma_min=0.3, steps=20)
    y = sd_flow(source, target, sigma=1.0, sigma_min=0.3, sigma_schedule="cosine", steps=20,
                step_size=[0.5 * s * s for s in sigmas], generator=1)
    noise = spread(target, lambda: swiss_roll(500, g))
    before, after = mmd(source, target), mmd(y, target)
    assert before > 30 * noise
    assert after < 3 * noise, (after, noise)


def test_target_batch():
    g = torch.Generator().manual_seed(1)
    source, target = torch.randn(40, 2, generator=g, dtype=F64), torch.randn(60, 2, generator=g, dtype=F64) + 2
    opts = dict(sigma=0.7, steps=6, step_size=0.2, generator=5)
    full = sd_flow(source, target, **opts)
    torch.testing.assert_close(sd_flow(source, target, target_batch=60, **opts), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sd_flow(source, target, target_batch=1000, **opts), full, rtol=1e-12, atol=1e-12)
    part = sd_flow(source, target, target_batch=20, **opts)
    torch.testing.assert_close(sd_flow(source, target, target_batch=20, **opts), part)  # deterministic
    assert not torch.allclose(part, full)
    assert (part.mean(0) - target.mean(0)).norm() < 0.5 * (source.mean(0) - target.mean(0)).norm()


def test_generator_object_and_seed_agree():
    x, t = torch.randn(10, 2, dtype=F64), torch.randn(15, 2, dtype=F64)
    a = sd_flow(x, t, sigma=0.5, steps=3, step_size=0.1, generator=7)
    b = sd_flow(x, t, sigma=0.5, steps=3, step_size=0.1, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------- MMD flow


def dense_mmd2(y, x, sigma):
    k = lambda a, b: torch.exp(-torch.cdist(a, b).square() / (2 * sigma * sigma))  # noqa: E731
    return k(y, y).mean() + k(x, x).mean() - 2 * k(y, x).mean()


def test_mmd_velocity_is_minus_witness_gradient():
    g = torch.Generator().manual_seed(2)
    y, x = torch.randn(9, 3, generator=g, dtype=F64), torch.randn(13, 3, generator=g, dtype=F64) + 1
    yg = y.clone().requires_grad_(True)
    grad = torch.autograd.grad(dense_mmd2(yg, x, 0.8), yg)[0]
    # MMD^2 = (1/N^2) sum k(y, y) - (2/(NM)) sum k(y, x) + c  =>  dMMD^2/dy_i = (2/N) grad f(y_i)
    torch.testing.assert_close(mmd_velocity(y, y, x, sigma=0.8), -(y.shape[0] / 2) * grad, rtol=1e-10, atol=1e-12)
    # off the particles: -grad of the witness f(z) = mean_i K(z, y_i) - mean_j K(z, x_j)
    z = torch.randn(5, 3, generator=g, dtype=F64).requires_grad_(True)
    k = lambda a, b: torch.exp(-torch.cdist(a, b).square() / (2 * 0.8 ** 2))  # noqa: E731
    witness = (k(z, y).mean(1) - k(z, x).mean(1)).sum()
    torch.testing.assert_close(mmd_velocity(z.detach(), y, x, sigma=0.8), -torch.autograd.grad(witness, z)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("noise_level", [0.0, 0.3])
def test_mmd_flow_decreases_mmd(noise_level):
    g = torch.Generator().manual_seed(4)
    x = swiss_roll(300, g)
    y0 = torch.randn(300, 2, generator=g, dtype=F64)
    _, traj = mmd_flow(y0, x, sigma=0.5, steps=30, step_size=3.0, noise_level=noise_level, generator=0,
                       return_trajectory=True)
    values = [float(dense_mmd2(traj[k], x, 0.5)) for k in (0, 10, 20, 30)]
    assert values[-1] < 0.3 * values[0], values
    assert all(b < a for a, b in zip(values, values[1:])), values


# ------------------------------------------------------------------------------- SVGD


def test_svgd_direction_matches_dense():
    g = torch.Generator().manual_seed(5)
    y, s = torch.randn(12, 3, generator=g, dtype=F64), torch.randn(12, 3, generator=g, dtype=F64)
    h = 1.7
    kern = torch.exp(-torch.cdist(y, y).square() / h)          # k(y_j, y_i), symmetric
    repulse = (2 / h) * (kern.sum(1)[:, None] * y - kern @ y)   # sum_j grad_{y_j} k(y_j, y_i)
    want = (kern @ s + repulse) / y.shape[0]
    torch.testing.assert_close(svgd_direction(y, s, bandwidth=h), want, rtol=1e-10, atol=1e-12)


def test_median_bandwidth():
    g = torch.Generator().manual_seed(6)
    y = torch.randn(9, 2, generator=g, dtype=F64)
    d2 = torch.cdist(y, y).square()
    pairs = d2[torch.triu_indices(9, 9, 1).unbind()]
    assert median_bandwidth(y) == pytest.approx(float(pairs.median()) / math.log(9), rel=1e-12)
    big = torch.randn(400, 2, generator=g, dtype=F64)  # 79,800 pairs: the random-pairs path by default
    exact = float(torch.pdist(big).square().median()) / math.log(400)
    assert median_bandwidth(big, max_pairs=79_800) == pytest.approx(exact, rel=1e-12)
    approx = median_bandwidth(big, generator=0)
    assert approx == pytest.approx(exact, rel=0.05) and approx != exact
    assert median_bandwidth(big, generator=0) == approx


def test_svgd_gaussian_target():
    """100 particles from N(0, I) to N([1, -2], C), 100 steps: measured mean error 0.04 (from 2.2),
    covariance within 0.09 (SVGD's finite-n variance shrinkage)."""
    mean, cov = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64)
    gm = GaussianMixture(mean[None], covs=cov[None])
    y0 = torch.randn(100, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    y = svgd(y0, score_from_log_prob(gm.log_prob), steps=100, step_size=0.5)
    assert (y.mean(0) - mean).norm() < 0.05 * (y0.mean(0) - mean).norm()
    assert (torch.cov(y.T) - cov).abs().max() < 0.15, torch.cov(y.T)


# ------------------------------------------------------------------------------- generator training


def test_train_sd_generator_learns_ring():
    """120 steps on an 8-Gaussian ring: measured MMD^2 3.1 -> 0.10 (untrained -> trained), the
    loss of the last 25 steps about 0.19x that of the first 25."""
    torch.manual_seed(0)
    gm = GaussianMixture.ring(8, 2.0, 0.2)
    target = gm.sample(1000, generator=torch.Generator().manual_seed(1))
    net = MLPGenerator(2, 2, hidden=64, depth=2)
    eval_eps = torch.randn(500, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = mmd(net(eval_eps), target)
    net, history = train_sd_generator(net, target, sigma=0.5, steps=120, batch_size=128, lr=3e-3,
                                      target_batch=300, generator=3)
    with torch.no_grad():
        after = mmd(net(eval_eps), target)
    assert len(history) == 120
    assert sum(history[-25:]) < 0.5 * sum(history[:25]), (history[:5], history[-5:])
    assert after < before / 10, (before, after)


def test_train_sd_generator_deterministic_and_resumes(tmp_path):
    target = torch.randn(100, 2)

    def run(steps, checkpoint=None):
        torch.manual_seed(0)
        net = MLPGenerator(3, 2, hidden=16, depth=1)
        return train_sd_generator(net, target, sigma=0.5, steps=steps, batch_size=32, generator=9,
                                  checkpoint=checkpoint, checkpoint_every=2)

    net_a, hist_a = run(6)
    ckpt = tmp_path / "gen.pt"
    run(3, ckpt)
    net_b, hist_b = run(6, ckpt)  # resumes from the checkpoint saved at the end of step 3
    assert hist_b == hist_a
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------- bad input


def test_bad_inputs():
    x, t = torch.randn(5, 2), torch.randn(6, 2)
    ok = dict(sigma=0.5, steps=2, step_size=0.1)
    with pytest.raises(ValueError, match=r"source must have shape \[N, d\]"):
        sd_flow(torch.randn(5), t, **ok)
    with pytest.raises(ValueError, match="target must have d = 2"):
        sd_flow(x, torch.randn(6, 3), **ok)
    with pytest.raises(ValueError, match="dtype and device"):
        sd_flow(x, t.double(), **ok)
    with pytest.raises(TypeError, match="float32 or float64"):
        sd_flow(x.long(), t, **ok)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        sd_flow(x, t, sigma=0.0, steps=2, step_size=0.1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sd_flow(x, t, sigma=0.5, steps=0, step_size=0.1)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        sd_flow(x, t, sigma=0.5, steps=2, step_size=-1.0)
    with pytest.raises(ValueError, match="sequence of steps = 2"):
        sd_flow(x, t, sigma=0.5, steps=2, step_size=[0.1])
    with pytest.raises(ValueError, match="did you mean 'geometric'"):
        sd_flow(x, t, sigma_schedule="geometrc", sigma_min=0.1, **ok)
    with pytest.raises(ValueError, match="needs sigma_min"):
        sd_flow(x, t, sigma_schedule="cosine", **ok)
    with pytest.raises(ValueError, match="sigma_min must be <= sigma"):
        sd_flow(x, t, sigma_schedule="linear", sigma_min=2.0, **ok)
    with pytest.raises(ValueError, match="did you mean 'identity'"):
        sd_flow(x, t, denoiser_q="identiy", **ok)
    with pytest.raises(ValueError, match="target_batch must be >= 1"):
        sd_flow(x, t, target_batch=0, **ok)
    with pytest.raises(TypeError, match="generator must be None, an int seed"):
        sd_flow(x, t, generator="seed", **ok)
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        mmd_flow(x, t, noise_level=-0.1, **ok)
    with pytest.raises(ValueError, match="bandwidth must be 'median'"):
        svgd(x, lambda y: -y, steps=2, step_size=0.1, bandwidth="mean")
    with pytest.raises(ValueError, match="score must return a tensor of the particles' shape"):
        svgd(x, lambda y: y[:, :1], steps=2, step_size=0.1)
    with pytest.raises(ValueError, match="coincide"):
        median_bandwidth(torch.ones(4, 2))
    with pytest.raises(ValueError, match="latent_dim is required"):
        train_sd_generator(torch.nn.Linear(2, 2), t, sigma=0.5, steps=1)


def test_divergence_names_the_step():
    x, t = torch.randn(5, 2), torch.randn(6, 2)
    with pytest.raises(FloatingPointError, match=r"sd_flow diverged at step \d"):
        sd_flow(x, t, sigma=0.5, steps=5, step_size=1e30, denoiser_q="identity", generator=0)
    with pytest.raises(FloatingPointError, match=r"mmd_flow diverged at step \d"):
        mmd_flow(x, t, sigma=0.5, steps=5, step_size=1e39)  # overflows float32 at the first step
    with pytest.raises(FloatingPointError, match=r"svgd diverged at step \d"):
        svgd(x, lambda y: -y, steps=5, step_size=1e38)


# ------------------------------------------------------------------------------- figure script


def test_figure_script_quick(tmp_path):
    out = tmp_path / "sd.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sd_flow_figure.py"), "--quick", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SD flow" in proc.stdout and "data vs data" in proc.stdout
