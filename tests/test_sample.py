"""gf.sample: API contract, reproducibility, per-sample seeds, trajectories, bad input."""
import pytest
import torch

import genflow as gf


@pytest.fixture(scope="module")
def model():
    return gf.GaussianMixture.ring(k=4, radius=2.0, std=0.4).model(gf.VP())


def test_same_seed_same_samples_and_different_seeds_differ(model):
    a = gf.sample(model, (32, 2), solver="euler_maruyama", steps=20, generator=123)
    b = gf.sample(model, (32, 2), solver="euler_maruyama", steps=20, generator=123)
    c = gf.sample(model, (32, 2), solver="euler_maruyama", steps=20, generator=124)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(gf.sample(model, (8, 2), steps=5, generator=g1), gf.sample(model, (8, 2), steps=5, generator=g2))


@pytest.mark.parametrize("solver", ["ddpm", "dpmpp_2m"])
def test_per_sample_seeds_do_not_depend_on_the_batch(model, solver):
    seeds = list(range(40, 48))
    batch = gf.sample(model, (8, 2), solver=solver, steps=10, generator=seeds)
    for i in (0, 3, 7):
        alone = gf.sample(model, (1, 2), solver=solver, steps=10, generator=[seeds[i]])
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-6, atol=1e-6)


def test_trajectory_callback_and_progress(model, capsys):
    seen = []
    x, traj = gf.sample(model, (6, 2), solver="heun", steps=7, generator=0, return_trajectory=True,
                        callback=lambda info: seen.append((info["i"], info["nfe"], info["x"].shape)), progress=True)
    assert traj.shape == (8, 6, 2) and torch.equal(traj[-1], x)
    assert [s[0] for s in seen] == list(range(7)) and seen[-1][1] == 14 and seen[0][2] == (6, 2)
    assert "genflow heun" in capsys.readouterr().err


def test_available_lists_order_stochasticity_and_nfe():
    info = {s.name: s for s in gf.solvers.available(steps=10)}
    assert info["heun"].order == 2 and info["heun"].nfe == 20 and not info["heun"].stochastic
    assert info["euler_maruyama"].stochastic and info["dpmpp_2m"].nfe == 10
    assert {"euler", "euler_maruyama", "ddim", "ddpm", "heun", "dpmpp_2m"} <= set(info)


def test_x_T_is_not_modified_and_dtypes_follow_it(model):
    x_T = torch.randn(5, 2, dtype=torch.float64)
    kept = x_T.clone()
    out = gf.sample(model, x_T=x_T, solver="ddim", steps=4)
    assert torch.equal(x_T, kept) and out.dtype == torch.float64
    assert gf.sample(model, (3, 2), steps=3, generator=0, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_float32_agrees_with_float64(model):
    a = gf.sample(model, (64, 2), solver="dpmpp_2m", steps=20, generator=9, dtype=torch.float64)
    b = gf.sample(model, (64, 2), solver="dpmpp_2m", steps=20, generator=9, dtype=torch.float32)
    torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"steps": 0}, ValueError, "steps"),
    ({"solver": "dpmpp2m"}, ValueError, "did you mean 'dpmpp_2m'"),
    ({"schedule": "linear"}, ValueError, "schedule"),
    ({"t_start": 0.2, "t_end": 0.5}, ValueError, "t_end"),
    ({"x_T": torch.full((4, 2), float("nan"))}, ValueError, "x_T"),
    ({"x_T": torch.zeros(4, 2, dtype=torch.int64)}, TypeError, "x_T"),
    ({"x_T": torch.zeros(3, 2)}, ValueError, "shape"),
    ({"solver": "heun", "eta": 0.5}, ValueError, "eta"),
    ({"solver": "ddim", "eta": 1.5}, ValueError, "eta"),
    ({"generator": [1, 2]}, ValueError, "per-sample seeds"),
    ({"generator": "seed"}, TypeError, "generator"),
    ({"backend": "gpu"}, ValueError, "backend"),
    ({"t_start": torch.tensor([1.0, 0.5])}, ValueError, "per-sample times"),
])
def test_bad_input_raises_naming_the_argument(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        gf.sample(model, (4, 2), **kwargs)


def test_bad_model_and_shape():
    with pytest.raises(TypeError, match="model"):
        gf.sample(lambda x, t: x, (4, 2))
    with pytest.raises(ValueError, match="shape"):
        gf.sample(gf.GaussianMixture.ring().model(gf.VP()))
    assert gf.sample(gf.GaussianMixture.ring().model(gf.VP()), (0, 2)).shape == (0, 2)  # empty batch: empty result
    with pytest.raises(ValueError, match="shape"):
        gf.sample(gf.GaussianMixture.ring().model(gf.VP()), (-1, 2))


def test_final_step_denoises_to_the_data_prediction(model):
    x, traj = gf.sample(model, (16, 2), solver="ddim", steps=10, generator=0, final_step="x0", return_trajectory=True)
    plain = gf.sample(model, (16, 2), solver="ddim", steps=10, generator=0)
    torch.testing.assert_close(x, model.x0(plain, model.process.t_min))
    assert torch.equal(traj[-1], x)
    with pytest.raises(ValueError, match="final_step"):
        gf.sample(model, (4, 2), final_step="eps")


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpmpp_2m"])
def test_dynamic_thresholding_clips_the_data_prediction(solver):
    far = gf.GaussianMixture([[3.0, -3.0]], [0.1]).model(gf.VP())
    x = gf.sample(far, (8, 2), solver=solver, steps=10, generator=0, thresholding=True, final_step="x0")
    assert x.abs().max() <= 1.0 + 1e-6
    unclipped = gf.sample(far, (8, 2), solver=solver, steps=10, generator=0, final_step="x0")
    assert unclipped.abs().max() > 2.5
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        gf.sample(far, (8, 2), solver=solver, thresholding=True, dynamic_thresholding_ratio=1.5)


@pytest.mark.parametrize("solver", ["euler", "heun", "euler_maruyama"])
def test_dynamic_thresholding_reaches_velocity_and_score_solvers(solver):
    far = gf.GaussianMixture([[3.0, -3.0]], [0.1]).model(gf.VP())
    plain = gf.sample(far, (8, 2), solver=solver, steps=10, generator=0)
    clipped = gf.sample(far, (8, 2), solver=solver, steps=10, generator=0, thresholding=True)
    assert (clipped - plain).abs().max() > 0.5


@pytest.mark.parametrize("solver, options", [("euler", {}), ("ddim", {}), ("ddim", {"eta": 0.5, "generator": 3}),
                                             ("dpmpp_2m", {})])
@pytest.mark.parametrize("kind", ["x0", "eps", "velocity"])
def test_repeated_solves_reuse_step_plans_without_leaking(solver, options, kind):
    """Scalar-grid steps cache their packed coefficients per grid, solver, prediction kind and
    options; a repeated solve equals one on a fresh process object (no cache), and a cached plan
    for one prediction kind is not used for another."""
    mix = gf.GaussianMixture.ring(k=4, radius=2.0, std=0.4)
    process = gf.VP()
    exact = mix.model(process)
    model = gf.Model(lambda x, t: exact.predict(x, t, kind), process, prediction=kind)
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = gf.sample(model, x_T=x_T, solver=solver, steps=8, **options)
    again = gf.sample(model, x_T=x_T, solver=solver, steps=8, **options)
    fresh_process = gf.VP()
    fresh_exact = mix.model(fresh_process)
    fresh = gf.sample(gf.Model(lambda x, t: fresh_exact.predict(x, t, kind), fresh_process, prediction=kind),
                      x_T=x_T, solver=solver, steps=8, **options)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, fresh, rtol=1e-12, atol=1e-12)
    reference = gf.sample(exact, x_T=x_T, solver=solver, steps=8, **options)  # the x0 model, same grid
    torch.testing.assert_close(first, reference, rtol=1e-9, atol=1e-9)
