"""Model defaults (steps, guidance, native size): one rule for the library and the scripts, as diffusers has them."""

import inspect
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from parity import nhwc, relative_error
from stable_diffusion import StableDiffusion, StableDiffusionXL, load_model

PROMPT = "a lighthouse at dusk"


def hub_cache_copy(folder, tmp_path, repo_id):
    """``folder`` laid out as the HF cache holds ``repo_id``."""
    snapshot = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots" / ("1" * 40)
    return shutil.copytree(folder, snapshot)


def with_unet_sample_size(folder, tmp_path, sample_size):
    copy = shutil.copytree(folder, tmp_path / "model")
    path = copy / "unet" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), sample_size=sample_size)))
    return copy


@pytest.mark.parametrize("cls, pipeline", [(StableDiffusion, StableDiffusionPipeline), (StableDiffusionXL, StableDiffusionXLPipeline)])
def test_steps_and_guidance_default_to_diffusers_pipeline_defaults(request, cls, pipeline):
    folder = request.getfixturevalue("tiny_sdxl" if cls is StableDiffusionXL else "tiny_sd1")
    sd = cls(str(folder))
    parameters = inspect.signature(pipeline.__call__).parameters
    assert sd.defaults.num_steps == parameters["num_inference_steps"].default == 50
    assert sd.defaults.cfg_weight == parameters["guidance_scale"].default


@pytest.mark.parametrize("sample_size", [12, [12, 8]])
def test_default_image_size_is_the_unets_sample_size_times_the_vae_factor_as_in_diffusers(tiny_sd2, tmp_path, sample_size):
    """SD 2.1 (768 px) has unet.sample_size 96: the library must make what diffusers makes, not 512 px."""
    folder = with_unet_sample_size(tiny_sd2, tmp_path, sample_size)
    sd = StableDiffusion(str(folder))
    ours = list(sd.generate_latents(PROMPT, num_steps=1, seed=0))[-1]
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, num_inference_steps=1, output_type="latent").images
    assert ours.shape == nhwc(ref).shape


def test_sd_turbo_from_the_hf_cache_runs_its_few_steps_without_guidance(tiny_sd2, tmp_path):
    """StableDiffusion("sd-turbo").generate_latents(p) runs the model card's 2 steps at CFG 0, not 50 at 7.5."""
    folder = hub_cache_copy(tiny_sd2, tmp_path, "stabilityai/sd-turbo")
    sd = StableDiffusion(str(folder))
    init = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    latents = list(sd.generate_latents(PROMPT, latents=nhwc(init)))
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, num_inference_steps=2, guidance_scale=0.0, latents=init.clone(), output_type="latent").images
    assert len(latents) == 2
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


def test_a_folder_whose_path_merely_contains_turbo_keeps_the_normal_defaults(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1, tmp_path / "work" / "turbo_dir" / "model")
    sd = load_model(str(folder))
    assert (sd.defaults.num_steps, sd.defaults.cfg_weight) == (50, 7.5)


@pytest.mark.parametrize("wrong, right", [(StableDiffusion, "StableDiffusionXL"), (StableDiffusionXL, "StableDiffusion")])
def test_the_wrong_facade_for_a_model_fails_at_once_naming_the_right_one(request, wrong, right):
    folder = request.getfixturevalue("tiny_sdxl" if wrong is StableDiffusion else "tiny_sd1")
    with pytest.raises(Exception, match=rf"{right}\(\.\.\.\) or load_model"):
        wrong(str(folder))

