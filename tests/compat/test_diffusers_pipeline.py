"""``gf.compat.diffusers`` schedulers inside real diffusers pipelines.

A tiny randomly initialised ``UNet2DModel`` (no download) drives ``DDIMPipeline`` and
``DDPMPipeline``; the scheduler is swapped with
``pipe.scheduler = gf.compat.diffusers.X.from_config(pipe.scheduler.config)`` and the image must
equal the one made with diffusers' own scheduler of the same class (same generator) to 1e-4.
"""
import pytest
import torch

import genflow as gf

from ..peers import diffusers

RTOL = 1e-4


@pytest.fixture(scope="module")
def unet():
    D = diffusers()
    torch.manual_seed(0)
    net = D.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return net.eval()


def _run(pipe, seed=0, **kwargs):
    with torch.no_grad():
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), output_type="pt",
                    **kwargs).images


def _swap_and_compare(pipe, name, **kwargs):
    """The image with diffusers' ``name`` and with ours, both swapped in from the pipeline's config."""
    D = diffusers()
    config = pipe.scheduler.config
    pipe.scheduler = getattr(D, name).from_config(config)
    expected = _run(pipe, **kwargs)
    pipe.scheduler = getattr(gf.compat.diffusers, name).from_config(config)
    assert type(pipe.scheduler).__module__.startswith("genflow.compat.diffusers")
    actual = _run(pipe, **kwargs)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_pipeline(unet, eta):
    D = diffusers()
    pipe = D.DDIMPipeline(unet=unet, scheduler=D.DDIMScheduler(clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    _swap_and_compare(pipe, "DDIMScheduler", num_inference_steps=6, eta=eta)


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler"])
def test_ddpm_pipeline(unet, name):
    """DDPMPipeline calls ``step(out, t, x, generator=)`` without ``scale_model_input``; swapped
    schedulers must still make diffusers' exact image."""
    D = diffusers()
    pipe = D.DDPMPipeline(unet=unet, scheduler=D.DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    _swap_and_compare(pipe, name, num_inference_steps=5)


def test_pipeline_config_records_swap(unet):
    D = diffusers()
    pipe = D.DDPMPipeline(unet=unet, scheduler=D.DDPMScheduler())
    pipe.scheduler = gf.compat.diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    assert pipe.config.scheduler[1] == "DDPMScheduler"
    assert pipe.components["scheduler"] is pipe.scheduler
