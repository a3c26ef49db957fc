"""The pieces of `genflow demo`: the KL estimator, the networks, the training loop, the k-diffusion bridge."""
import math

import pytest
import torch

import genflow as gf
from genflow import demo
from genflow.metrics import kl_to_density
from tests.peers import k_diffusion_sampling


@pytest.fixture(autouse=True)
def single_thread():
    """As ``genflow demo`` runs: tiny 2-D batches train far faster on one thread on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ring():
    return gf.GaussianMixture.ring(k=8, radius=4.0, std=0.5)


def test_kl_to_density_is_near_zero_for_the_density_itself_and_grows_with_the_error(ring):
    x = ring.sample(2000, generator=torch.Generator().manual_seed(0))
    exact = kl_to_density(x, ring.log_prob)
    assert abs(exact) < 0.05
    blurred = kl_to_density(x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), ring.log_prob)
    assert blurred > exact + 0.15
    # dropping half of the equally weighted modes costs log 2
    angle = torch.atan2(x[:, 1], x[:, 0])
    half = x[torch.remainder(torch.round(angle / (math.pi / 4)), 2) == 0]
    assert kl_to_density(half, ring.log_prob) == pytest.approx(math.log(2), abs=0.07)


def test_kl_to_density_matches_a_gaussian_in_closed_form():
    # q = N(0, I), p = N(0, 4 I) in 2-D: KL = log 4 + 1/4 - 1 (per dimension halves, times 2)
    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = gf.GaussianMixture(torch.zeros(1, 2), 2.0)
    assert kl_to_density(x, p.log_prob) == pytest.approx(math.log(4) + 0.25 - 1, abs=0.03)


@pytest.mark.parametrize("x, k, message", [
    (torch.zeros(10), 3, "x must be"),
    (torch.zeros(3, 2), 3, "more than k"),
    (torch.zeros(10, 2), 0, "k must be"),
    (torch.full((10, 2), math.nan), 3, "finite"),
])
def test_kl_to_density_argument_errors(ring, x, k, message):
    with pytest.raises(ValueError, match=message):
        kl_to_density(x, ring.log_prob, k=k)


def test_data_std_is_the_rms_coordinate_std(ring):
    assert demo._data_std(ring) == pytest.approx(math.sqrt(4.0 ** 2 / 2 + 0.5 ** 2))


def test_velocity_net_keeps_shapes():
    torch.manual_seed(0)
    x = torch.randn(16, 2)
    assert demo.VelocityNet(gf.LinearPath(), 2.0)(x, torch.rand(16)).shape == (16, 2)


def test_demo_models_train_deterministically_on_the_trainer_and_learn_the_ring(ring):
    """The demo's two families (flow matching, EDM) trained by genflow.train: the same seed gives
    the same weights, and a short training gets the flow model's samples much closer to the ring."""
    from argparse import Namespace

    torch.set_num_threads(1)
    try:
        first = demo._trained_models(ring, Namespace(seed=0, train_steps=120))
        second = demo._trained_models(ring, Namespace(seed=0, train_steps=120))
        untrained = demo._trained_models(ring, Namespace(seed=0, train_steps=1))
    finally:
        torch.set_num_threads(2)
    for a, b in zip(first, second):
        assert all(torch.equal(p, q) for p, q in zip(a.model.net.parameters(), b.model.net.parameters())), a.name
    assert [m.model.prediction for m in first] == ["velocity", "x0"]
    truth = ring.sample(512, generator=torch.Generator().manual_seed(1))

    def flow_mmd(models):
        x = gf.sample(models[0].model, (512, 2), solver="heun", steps=10, schedule="uniform", generator=0)
        return gf.metrics.mmd(x, truth)

    assert flow_mmd(first) < 0.3 * flow_mmd(untrained)  # measured 0.109 vs 1.128


def test_k_diffusion_runs_the_same_solver_on_edm(ring):
    k_sampling = k_diffusion_sampling()
    process = gf.EDM()
    model = ring.model(process)
    ts = gf.time_grid(process, 8, "karras")
    x_T = process.prior_sample((256, 2), generator=torch.Generator().manual_seed(0))
    for solver in ("euler", "heun"):
        ours = gf.sample(model, solver=solver, steps=8, schedule="karras", x_T=x_T)
        theirs = demo._k_sample(k_sampling, solver, model.net, x_T, ts.float(), 0)
        assert torch.allclose(ours, theirs, atol=1e-4), solver


def test_k_diffusion_denoiser_changes_variables_for_vp(ring):
    # DPM-Solver++(2M) is invariant to the x / alpha, sigma / alpha change of variables
    k_sampling = k_diffusion_sampling()
    process = gf.VP()
    model = ring.model(process)
    ts = gf.time_grid(process, 12, "logsnr")
    x_T = process.prior_sample((256, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = gf.sample(model, solver="dpmpp_2m", steps=12, x_T=x_T, lower_order_final=False)
    sigmas = torch.exp(-process.log_snr(ts))
    theirs = demo._k_sample(k_sampling, "dpmpp_2m", demo._KDenoiser(model), x_T / process.alpha(process.T), sigmas, 0)
    assert torch.allclose(ours, theirs * process.alpha(process.t_min), atol=1e-6)
