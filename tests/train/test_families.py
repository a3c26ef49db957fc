"""Training families (genflow/train/families.py): losses, sharding independence, short trainings."""
import pytest
import torch

import genflow as gf
from genflow.metrics import mmd
from genflow.train.families import FAMILIES, Family, make_family, reflow_pairs, register_family

RING = gf.GaussianMixture.ring(k=8, radius=2.0, std=0.15)
DATA = RING.sample(4096, generator=torch.Generator().manual_seed(0))
REFERENCE = RING.sample(500, generator=torch.Generator().manual_seed(1))
SMALL = dict(net_options=dict(hidden=64, layers=2))

# (family, options) covering every family and the main objective options
CASES = [
    ("diffusion", {}),
    ("diffusion", dict(prediction="x0", weighting="min_snr")),
    ("diffusion", dict(prediction="v", weighting="snr", process="CosineVP")),
    ("diffusion", dict(weighting="likelihood", importance_sampling=True)),
    ("diffusion", dict(process="VE")),
    ("diffusion", dict(process="EDM")),
    ("diffusion", dict(process="SubVP", preconditioning="edm")),
    ("flow-matching", dict(sigma_min=0.05)),
    ("flow-matching", dict(coupling="ot")),
    ("flow-matching", dict(coupling="sinkhorn")),
    ("rectified-flow", {}),
    ("cnf", dict(hidden=16, depth=2, solve_steps=2)),
    ("sliced-score", {}),
    ("sliced-score", dict(sigma=0.3, projection="gaussian", variance_reduction=False, projections=2)),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks run fastest (and least disturbed by a busy machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _family(name, **options):
    torch.manual_seed(0)
    extra = {} if name == "cnf" or "net" in options else SMALL
    return make_family(name, data_shape=(2,), **extra, **options)


def _seeds(n, start=0):
    return torch.arange(start, start + n, dtype=torch.int64)


def _train(family, steps, batch=128, lr=3e-3):
    opt = torch.optim.Adam(family.parameters("main"), lr=lr)
    g = torch.Generator().manual_seed(2)
    losses = []
    for i in range(steps):
        x = DATA[torch.randint(len(DATA), (batch,), generator=g)]
        loss = family.loss("main", x, seeds=_seeds(batch, i * batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_loss_backward_and_sample_shape(name, options):
    family = _family(name, **options)
    assert isinstance(family, Family) and family.name == name and family.phases == ("main",)
    loss = family.loss("main", DATA[:32], seeds=_seeds(32))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in family.parameters("main")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    out = family.sample(8, generator=0, steps=3)
    assert out.shape == (8, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("name,options", [c for c in CASES if c[1].get("coupling") not in ("ot", "sinkhorn")],
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_loss_is_independent_of_sharding(name, options):
    family = _family(name, **options)
    x, seeds = DATA[:16], _seeds(16, 100)
    whole = family.loss("main", x, seeds=seeds)
    halves = (family.loss("main", x[:8], seeds=seeds[:8]) + family.loss("main", x[8:], seeds=seeds[8:])) / 2
    torch.testing.assert_close(whole, halves, rtol=1e-5, atol=1e-6)
    other = family.loss("main", x, seeds=seeds + 1)  # the seeds do matter
    assert not torch.equal(whole, other)


def test_ot_coupling_pairs_the_batch_differently():
    ot, independent = _family("flow-matching", coupling="ot"), _family("flow-matching")
    x, seeds = DATA[:64], _seeds(64)
    _, noise_ot = ot.pair(x, seeds)
    _, noise = independent.pair(x, seeds)
    assert sorted(map(tuple, noise_ot.tolist())) == sorted(map(tuple, noise.tolist()))  # a permutation
    assert (x - noise_ot).square().sum() < 0.8 * (x - noise).square().sum()  # of lower transport cost


@pytest.mark.parametrize("name,options", [("diffusion", {}), ("flow-matching", {})])
def test_training_improves_sample_mmd(name, options):
    family = _family(name, **options)
    before = mmd(family.sample(500, generator=3), REFERENCE)
    losses = _train(family, 150)
    after = mmd(family.sample(500, generator=3), REFERENCE)
    assert sum(losses[-20:]) < sum(losses[:20])
    assert after < 0.25 * before, (before, after)


@pytest.mark.parametrize("name,options,steps", [
    ("diffusion", dict(process="EDM"), 80),
    ("diffusion", dict(weighting="likelihood", importance_sampling=True), 80),
    ("flow-matching", dict(coupling="ot"), 60),
    ("flow-matching", dict(coupling="sinkhorn"), 30),
    ("rectified-flow", {}, 60),
    ("cnf", dict(hidden=32, depth=2, solve_steps=4), 30),
    ("sliced-score", {}, 80),
])
def test_short_training_decreases_loss(name, options, steps):
    losses = _train(_family(name, **options), steps, batch=64)
    assert all(map(lambda v: v == v, losses))  # no NaN
    assert sum(losses[-10:]) < sum(losses[:10]), (losses[:10], losses[-10:])


def test_reflow_pairs_and_training_on_them():
    family = _family("rectified-flow")
    _train(family, 30)
    pairs = reflow_pairs(family, 64, steps=4, generator=5)
    assert pairs.shape == (64, 2, 2)
    z = gf.ops.randn((64, 2), seed=5)
    torch.testing.assert_close(pairs[:, 1], z)
    expected = gf.sample(family.model(), x_T=z, solver="euler", steps=4, schedule="uniform")
    torch.testing.assert_close(pairs[:, 0], expected)
    loss = family.loss("main", pairs, seeds=_seeds(64))  # trains on the given (x, z) pairs
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="deterministic"):
        reflow_pairs(family, 8, solver="euler_maruyama")


def test_classifier_free_guidance_and_label_dropout():
    family = make_family("diffusion", data_shape=(2,), num_classes=3, **SMALL)
    assert family.label_dropout == pytest.approx(0.1)
    labels = torch.tensor([0, 1, 2, 0] * 8)
    loss = family.loss("main", DATA[:32], labels=labels, seeds=_seeds(32))
    loss.backward()
    # dropout on every sample is the unconditional loss
    family.label_dropout = 1.0
    dropped = family.loss("main", DATA[:32], labels=labels, seeds=_seeds(32))
    uncond = family.loss("main", DATA[:32], labels=torch.full((32,), -1), seeds=_seeds(32))
    torch.testing.assert_close(dropped, uncond)
    guided = family.sample(6, generator=1, labels=2, guidance_scale=3.0, steps=4)
    plain = family.sample(6, generator=1, labels=2, steps=4)
    assert guided.shape == plain.shape == (6, 2) and not torch.allclose(guided, plain)


def test_log_likelihood_and_state_dict():
    family = _family("flow-matching")
    ll = family.log_likelihood(DATA[:8], method="exact", rtol=1e-3, atol=1e-3)
    assert ll.shape == (8,) and torch.isfinite(ll).all()
    other = _family("flow-matching")
    with torch.no_grad():
        for p in other.modules.parameters():
            p.add_(1.0)
    other.load_state_dict(family.state_dict())
    torch.testing.assert_close(other.loss("main", DATA[:8], seeds=_seeds(8)),
                               family.loss("main", DATA[:8], seeds=_seeds(8)))
    assert _family("cnf", hidden=8, depth=1).log_likelihood(DATA[:4], method="exact").shape == (4,)
    ll = _family("diffusion").log_likelihood(DATA[:4], method="exact", rtol=1e-3, atol=1e-3)
    assert ll.shape == (4,) and torch.isfinite(ll).all()
    assert _family("sliced-score").log_likelihood(DATA[:4], method="exact", rtol=1e-3, atol=1e-3).shape == (4,)


def test_sliced_score_samplers():
    family = _family("sliced-score")
    for solver in ("ald", "heun"):  # annealed Langevin and the probability-flow ODE
        out = family.sample(8, generator=0, solver=solver, steps=3)
        assert out.shape == (8, 2) and torch.isfinite(out).all()
    assert _family("sliced-score", sigma=0.3).log_likelihood(DATA[:4]) is None


def test_images_use_the_unet():
    family = make_family("diffusion", data_shape=(1, 8, 8), net_options=dict(base=8, mults=(1, 2)))
    x = torch.randn(4, 1, 8, 8)
    family.loss("main", x, seeds=_seeds(4)).backward()
    assert family.sample(2, generator=0, steps=2).shape == (2, 1, 8, 8)


def test_registry_errors():
    with pytest.raises(ValueError, match="did you mean 'diffusion'"):
        make_family("difusion", data_shape=(2,))
    with pytest.raises(ValueError, match="did you mean 'coupling'"):
        make_family("flow_matching", data_shape=(2,), couplng="ot")
    with pytest.raises(ValueError, match="did you mean 'VP'|did you mean 'vp'"):
        make_family("diffusion", data_shape=(2,), process="VPP")
    with pytest.raises(ValueError, match="weighting"):
        make_family("diffusion", data_shape=(2,), weighting="minsnr")
    with pytest.raises(ValueError, match="data_shape"):
        make_family("diffusion", data_shape=(0,))
    family = _family("diffusion")
    with pytest.raises(ValueError, match="seeds"):
        family.loss("main", DATA[:4], seeds=torch.arange(3))
    with pytest.raises(ValueError, match="phase"):
        family.loss("generator", DATA[:4], seeds=_seeds(4))
    with pytest.raises(ValueError, match="batch"):
        family.loss("main", torch.randn(4, 3), seeds=_seeds(4))

    class Custom(Family):
        name = "custom"

    register_family("custom", Custom)
    try:
        assert FAMILIES["custom"] is Custom
    finally:
        del FAMILIES["custom"]
