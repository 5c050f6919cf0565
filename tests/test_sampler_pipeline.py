"""Samplers through the facade and the scripts: A1111 names, img2img's order-aware start, step noise, infotext round trip."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from parity import nhwc, reference_pipeline, relative_error, run_latents, torch_step_noise

from stable_diffusion import StableDiffusion, distributed, images
from stable_diffusion.sampler_names import TABLE, a1111_label, make_sampler, parse_infotext_sampler, resolve
from stable_diffusion.scripts import txt2image

SIZE = 32
PROMPT = "a lighthouse on a cliff"


@pytest.fixture
def posterior_mean_img2img(monkeypatch):
    """diffusers' img2img samples the VAE posterior; we start from its mean (issue 2). Make diffusers do the same."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as module

    retrieve = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": retrieve(out, generator, "argmax"))


@pytest.mark.parametrize("name, diffusers_class", [("Heun", "HeunDiscreteScheduler"), ("DPM2", "KDPM2DiscreteScheduler"), ("PLMS", "PNDMScheduler")])
def test_img2img_starts_at_t_start_times_the_samplers_order(tiny_sd1, posterior_mean_img2img, name, diffusers_class):
    """diffusers' get_timesteps: a 2nd-order sampler's img2img skips t_start * order timestep entries."""
    steps, strength = 6, 0.5
    image = np.random.default_rng(1).uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32)
    noise = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(2))
    sd = StableDiffusion(str(tiny_sd1), sampler=name)
    ours = run_latents(sd.generate_latents_from_image(mx.array(image * 2 - 1), PROMPT, strength=strength, num_steps=steps, noise=nhwc(noise)))

    pipe = reference_pipeline(tiny_sd1, diffusers_class, img2img=True)
    calls = []
    ref = pipe(
        PROMPT, image=image[None], strength=strength, num_inference_steps=steps, generator=torch.Generator().manual_seed(2), output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: calls.append(int(t)) or {},
    ).images
    assert len(ours) == len(calls) == sd.denoising_calls(steps, strength)
    assert relative_error(ours[-1], nhwc(ref)) <= 1e-4


@pytest.mark.parametrize("name", ["DPM2 a", "DPM++ SDE"])
def test_the_scripts_step_noise_is_the_seeds_for_a_second_order_stochastic_sampler(tiny_sd1, name):
    """distributed.step_noise over denoising_calls(steps) keys draws what generate_latents(seed=...) draws."""
    steps, seed = 3, 11
    sd = StableDiffusion(str(tiny_sd1), sampler=name)
    calls = sd.denoising_calls(steps)
    assert calls > steps  # 2nd order: more UNet calls than steps
    alone = run_latents(sd.generate_latents(PROMPT, num_steps=steps, latent_size=(8, 8), seed=seed))
    batch = run_latents(
        sd.generate_latents(
            PROMPT, num_steps=steps, latents=distributed.initial_noise([seed], (8, 8, 4)), step_noise=distributed.step_noise([seed], calls)
        )
    )
    assert len(alone) == calls
    np.testing.assert_array_equal(np.array(alone[-1]), np.array(batch[-1]))


def test_a_1111_name_and_schedule_reach_diffusers_karras_sigmas(tiny_sd1):
    """sampler="DPM++ 2M" with schedule="karras" (and the legacy "DPM++ 2M Karras") is diffusers' DPMSolverMultistep with use_karras_sigmas."""
    steps = 5
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(6))
    sd = StableDiffusion(str(tiny_sd1), sampler="DPM++ 2M", schedule="karras")
    ours = run_latents(sd.generate_latents(PROMPT, num_steps=steps, latents=nhwc(init)))
    legacy = run_latents(sd.generate_latents(PROMPT, num_steps=steps, latents=nhwc(init), sampler="DPM++ 2M Karras"))

    import diffusers

    pipe = reference_pipeline(tiny_sd1)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)
    ref = pipe(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, latents=init.clone(), output_type="latent").images
    assert relative_error(ours[-1], nhwc(ref)) <= 1e-4
    np.testing.assert_array_equal(np.array(ours[-1]), np.array(legacy[-1]))


def test_a_call_schedule_alone_applies_to_the_facades_sampler(tiny_sd1):
    sd = StableDiffusion(str(tiny_sd1), sampler="euler")
    init = mx.random.normal((1, 8, 8, 4), key=mx.random.key(0))
    karras = run_latents(sd.generate_latents(PROMPT, num_steps=3, latents=init, schedule="karras"))[-1]
    named = run_latents(StableDiffusion(str(tiny_sd1), sampler="euler", schedule="karras").generate_latents(PROMPT, num_steps=3, latents=init))[-1]
    plain = run_latents(sd.generate_latents(PROMPT, num_steps=3, latents=init))[-1]
    np.testing.assert_array_equal(np.array(karras), np.array(named))
    assert not np.array_equal(np.array(karras), np.array(plain))


CLI_CASES = [(row.a1111, None, "diffusers") for row in TABLE] + [(row.id, None, "diffusers") for row in TABLE] + [
    ("dpm++ 2m sde karras", None, "diffusers"),  # a legacy name, any case
    ("Euler", "Exponential", "diffusers"),
    ("DPM2 a", "karras", "a1111"),
    ("Heun", None, "a1111"),
]


@pytest.mark.parametrize("name, schedule, rules", CLI_CASES)
def test_every_sampler_name_runs_in_the_cli_and_its_infotext_reads_back(tiny_sd1, tmp_path, name, schedule, rules):
    out = tmp_path / "out.png"
    args = [PROMPT, "--model", str(tiny_sd1), "--sampler", name, "--sampler-rules", rules, "--steps", "2", "--width", "32", "--height", "32", "--seed", "1", "--no-float16", "-o", str(out)]
    txt2image.main(args + (["--schedule", schedule] if schedule else []))
    p = images.parse_parameters(images.read_parameters(out))
    written = (p["Sampler"], p.get("Schedule type"))
    expected_id, _ = resolve(name, schedule)
    parsed_id, parsed_schedule = parse_infotext_sampler(*written)
    assert parsed_id == expected_id
    config = StableDiffusion(str(tiny_sd1)).scheduler_config
    assert written == a1111_label(make_sampler(name, config, schedule, rules))
    # The parameters text rebuilds the sampler that ran: the same steps on the same inputs.
    assert _trajectory(make_sampler(parsed_id, config, parsed_schedule, rules)) == _trajectory(make_sampler(name, config, schedule, rules))


def _trajectory(sampler, steps=3) -> list:
    """Every timestep and latent of a run on fixed model outputs and noise."""
    sampler.set_timesteps(steps)
    key = mx.random.key(0)
    x = mx.random.normal((1, 2, 2, 4), key=key) * sampler.init_noise_sigma
    out = []
    for i in range(len(sampler.timesteps)):
        eps = mx.random.normal(x.shape, key=mx.random.key(i + 1))
        x = sampler.step(eps, i, x, mx.random.normal(x.shape, key=mx.random.key(100 + i)))
        out.append((float(sampler.timesteps[i]), np.array(x).tobytes()))
    return out


def test_an_unknown_sampler_is_one_line_listing_the_names(tmp_path, capsys):
    from stable_diffusion import cli

    with pytest.raises(SystemExit) as exit:
        cli.run_cli(lambda: txt2image.main(["a cat", "--sampler", "Foo Sampler", "-o", str(tmp_path / "x.png")]), "sd-txt2image")
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sampler" in err and "'DPM++ 2M'" in err and "'UniPC'" in err


@pytest.mark.parametrize("steps, strength", [(10, 0.3), (10, 1.0), (7, 0.75)])
def test_img2img_under_a1111_rules_runs_a1111s_steps(tiny_sd1, steps, strength):
    """A1111's img2img (sd_samplers_common.setup_img2img_steps) runs int(min(strength, 0.999) * steps) + 1
    steps, from sigmas[steps - t_enc - 1]: one more than diffusers' get_timesteps."""
    sd = StableDiffusion(str(tiny_sd1), sampler="Euler", sampler_rules="a1111")
    t_enc = int(min(strength, 0.999) * steps)
    assert sd.denoising_calls(steps, strength=strength) == t_enc + 1
    image = np.zeros((32, 32, 3), dtype=np.float32)
    assert len(list(sd.generate_latents_from_image(image, "a cat", num_steps=steps, strength=strength, cfg_weight=0))) == t_enc + 1
