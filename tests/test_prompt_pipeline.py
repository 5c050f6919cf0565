"""Whole generations with A1111 prompts: our facade against an A1111-algorithm reference.

The reference conditioning is tests/a1111_reference.py (A1111's chunking, weights and emphasis on
transformers' CLIP); it drives diffusers' UNet and scheduler on the same tiny weights and noise, with
classifier-free guidance as A1111 runs it: one batched UNet call when the prompt and the negative
have as many chunks (or after "Pad conds" padded the shorter one with the empty prompt's chunk),
else one call for each.
"""

import lora_files
import mlx.core as mx
import numpy as np
import pytest
import ti_files
import torch
from a1111_reference import encode_sd, encode_sdxl
from mlx.utils import tree_flatten
from parity import nhwc, reference_pipeline, relative_error, run_latents

from stable_diffusion import StableDiffusion, StableDiffusionXL

SIZE = 32  # pixels; the tiny VAE downsamples 4x: 8x8 latents
STEPS = 4
# Weighted, with BREAK and commas: 3 chunks of 77 on the CLIP tokenizers.
LONG = (
    "a (red:1.3) house on a hill, " * 9
    + "BREAK ((tall)) trees, [fog], "
    + "a quiet lake with (small boats:0.8), mountains and clouds, " * 10
)
# A negative embedding, as Civitai prompts use one: its name expands to its vectors (ti_files writes it).
NEGATIVE = "EasyNegative, blurry, (low quality:1.2)"


def _negative_embedding(sd, folder, dims: tuple):
    """An "EasyNegative" file of 3 random vectors per text encoder, loaded into ``sd``; the Embedding."""
    vectors = [ti_files.random_vectors(3, d, seed=i) for i, d in enumerate(dims)]
    write = ti_files.write_a1111_sdxl if len(dims) == 2 else ti_files.write_a1111_sd
    return sd.load_embedding(write(folder / "EasyNegative.safetensors", *vectors))


def _chunks(context) -> int:
    return context.shape[1] // 77


def _reference_loop(pipe, init, cfg, cond_at, uncond, batched, added=None):
    """diffusers' UNet and scheduler; cond_at(k) the prompt's conditioning at UNet call k; guidance as A1111.

    ``added(which)``: SDXL's added_cond_kwargs for "uncond", "cond" or "both"."""
    scheduler, unet = pipe.scheduler, pipe.unet
    scheduler.set_timesteps(STEPS)
    x = init.clone() * scheduler.init_noise_sigma
    extra = added or (lambda which, k: None)
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            x_in = scheduler.scale_model_input(x, t)
            cond = cond_at(k)
            if batched:
                out = unet(torch.cat([x_in, x_in]), t, torch.cat([uncond, cond]), added_cond_kwargs=extra("both", k)).sample
                eps_uncond, eps_cond = out.chunk(2)
            else:
                eps_uncond = unet(x_in, t, uncond, added_cond_kwargs=extra("uncond", k)).sample
                eps_cond = unet(x_in, t, cond, added_cond_kwargs=extra("cond", k)).sample
            x = scheduler.step(eps_uncond + cfg * (eps_cond - eps_uncond), t, x).prev_sample
    return x


def _init(seed=7):
    return torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pad_conds", [False, True])
def test_sd1_three_chunk_weighted_prompt_matches_the_a1111_reference(tiny_sd1, pad_conds, tmp_path):
    cfg, init = 6.0, _init()
    sd = StableDiffusion(str(tiny_sd1), sampler="Euler")
    embedding = _negative_embedding(sd, tmp_path, (sd.text_encoder.config.model_dims,))
    ours = run_latents(sd.generate_latents(LONG, num_steps=STEPS, cfg_weight=cfg, negative_text=NEGATIVE, latents=nhwc(init), pad_conds=pad_conds))

    pipe = reference_pipeline(tiny_sd1, "EulerDiscreteScheduler")
    cond = encode_sd(pipe.tokenizer, pipe.text_encoder, LONG)
    uncond = encode_sd(pipe.tokenizer, pipe.text_encoder, NEGATIVE, embeddings=[embedding])
    assert not torch.equal(uncond, encode_sd(pipe.tokenizer, pipe.text_encoder, NEGATIVE))  # the embedding counts
    empty = encode_sd(pipe.tokenizer, pipe.text_encoder, "")
    assert (_chunks(cond), _chunks(uncond)) == (3, 1)
    two_calls = _reference_loop(pipe, init, cfg, lambda k: cond, uncond, batched=False)
    # A1111's pad_cond: the empty prompt's chunk appended to the shorter, then one batched call.
    padded = _reference_loop(pipe, init, cfg, lambda k: cond, torch.cat([uncond, empty, empty], dim=1), batched=True)

    assert len(ours) == STEPS
    assert relative_error(ours[-1], nhwc(padded if pad_conds else two_calls)) <= 1e-4
    assert relative_error(nhwc(two_calls), nhwc(padded)) > 1e-2  # the two policies are different images


@pytest.mark.parametrize("pad_conds", [False, True])
def test_sdxl_three_chunk_weighted_prompt_matches_the_a1111_reference(tiny_sdxl, pad_conds, tmp_path):
    cfg, init = 5.0, _init(8)
    sd = StableDiffusionXL(str(tiny_sdxl), sampler="Euler")
    embedding = _negative_embedding(sd, tmp_path, tuple(e.config.model_dims for e in sd._text_encoders()))
    ours = run_latents(sd.generate_latents(LONG, num_steps=STEPS, cfg_weight=cfg, negative_text=NEGATIVE, latents=nhwc(init), pad_conds=pad_conds))

    pipe = reference_pipeline(tiny_sdxl, "EulerDiscreteScheduler", xl=True)
    tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    cond, cond_pooled = encode_sdxl(tokenizers, encoders, LONG)
    uncond, uncond_pooled = encode_sdxl(tokenizers, encoders, NEGATIVE, embeddings=[embedding])
    assert (_chunks(cond), _chunks(uncond)) == (3, 1)
    if pad_conds:
        empty, _ = encode_sdxl(tokenizers, encoders, "")
        uncond = torch.cat([uncond, empty, empty], dim=1)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    pooled = {"uncond": uncond_pooled, "cond": cond_pooled, "both": torch.cat([uncond_pooled, cond_pooled])}

    def added(which, k):
        text_embeds = pooled[which]
        return {"text_embeds": text_embeds, "time_ids": time_ids.repeat(text_embeds.shape[0], 1)}

    ref = _reference_loop(pipe, init, cfg, lambda k: cond, uncond, batched=pad_conds, added=added)
    assert relative_error(ours[-1], nhwc(ref)) <= 1e-4


def test_sdxl_empty_negative_is_zeros_with_a_long_prompt(tiny_sdxl):
    """diffusers' force_zeros_for_empty_prompt (A1111's force_zero_negative_prompt): zeros, whatever the prompt's length."""
    cfg, init = 5.0, _init(9)
    sd = StableDiffusionXL(str(tiny_sdxl), sampler="Euler")
    ours = run_latents(sd.generate_latents(LONG, num_steps=STEPS, cfg_weight=cfg, latents=nhwc(init)))

    pipe = reference_pipeline(tiny_sdxl, "EulerDiscreteScheduler", xl=True)
    cond, cond_pooled = encode_sdxl([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], LONG)
    ref = pipe(
        prompt_embeds=cond,
        pooled_prompt_embeds=cond_pooled,
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        height=SIZE,
        width=SIZE,
        latents=init.clone(),
        output_type="latent",
    ).images  # diffusers zeros the negative as prompt_embeds' shape: 3 chunks; ours one; all-zero keys give the same attention
    assert relative_error(ours[-1], nhwc(ref)) <= 1e-4


def test_prompt_editing_switches_the_conditioning_after_the_given_step(tiny_sd1):
    """``[cat:dog:2]`` over 4 steps: A1111's schedule (2, cat), (4, dog); UNet call k takes the first entry with k <= end."""
    cfg, init = 5.0, _init(3)
    sd = StableDiffusion(str(tiny_sd1), sampler="euler")
    prompt = "a photo of a [cat:dog:2] on a sofa"
    ours = run_latents(sd.generate_latents(prompt, num_steps=STEPS, cfg_weight=cfg, latents=nhwc(init)))

    pipe = reference_pipeline(tiny_sd1, "EulerDiscreteScheduler")
    # One prompt's scheduled texts are encoded in one batch, as A1111 does.
    both = encode_sd(pipe.tokenizer, pipe.text_encoder, ["a photo of a cat on a sofa", "a photo of a dog on a sofa"])
    uncond = encode_sd(pipe.tokenizer, pipe.text_encoder, "")
    ref = _reference_loop(pipe, init, cfg, lambda k: both[0:1] if k <= 2 else both[1:2], uncond, batched=True)
    assert relative_error(ours[-1], nhwc(ref)) <= 1e-4


def test_plain_prompt_is_bit_identical_with_either_syntax(tiny_sd1):
    """Within 75 tokens and without syntax, A1111 reading gives diffusers' embeddings bit for bit."""
    sd = StableDiffusion(str(tiny_sd1), sampler="euler")
    init = mx.random.normal((1, 8, 8, 4), key=mx.random.key(2))
    common = dict(num_steps=2, cfg_weight=5.0, negative_text="blurry", latents=init)
    a1111 = run_latents(sd.generate_latents("a red house on a hill", **common))[-1]
    literal = run_latents(sd.generate_latents("a red house on a hill", prompt_syntax="none", **common))[-1]
    np.testing.assert_array_equal(np.array(a1111), np.array(literal))


def test_literal_syntax_reads_brackets_and_lora_tags_as_words(tiny_sd1, tmp_path):
    """prompt_syntax="none": no weights, no schedule, no LoRA lookup (a missing lora_dir is no error)."""
    sd = StableDiffusion(str(tiny_sd1), sampler="euler")
    init = mx.random.normal((1, 8, 8, 4), key=mx.random.key(2))
    text = "a (red:1.5) [cat:dog:1] <lora:nowhere:1>"
    ours = run_latents(sd.generate_latents(text, num_steps=2, cfg_weight=1.0, latents=init, prompt_syntax="none"))[-1]
    pipe = reference_pipeline(tiny_sd1, "EulerDiscreteScheduler")
    ref = pipe(text, num_inference_steps=2, guidance_scale=1.0, height=SIZE, width=SIZE, latents=torch.from_numpy(np.array(init).transpose(0, 3, 1, 2)), output_type="latent").images
    assert relative_error(ours, nhwc(ref)) <= 1e-4


def test_a_prompt_lora_tag_that_names_no_file_is_one_value_error(tiny_sd1, tmp_path):
    sd = StableDiffusion(str(tiny_sd1))
    with pytest.raises(ValueError, match=r"<lora:missing:0.7>.*no file") as error:
        sd.generate_latents("a cat <lora:missing:0.7>", num_steps=1, lora_dir=str(tmp_path))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="lora_dir"):
        sd.generate_latents("a cat <lora:missing:0.7>", num_steps=1)


@pytest.mark.parametrize("bad", [dict(prompt_syntax="compel"), dict(emphasis="original"), dict(clip_skip=0), dict(clip_skip=True), dict(pad_conds="yes")])
def test_bad_prompt_options_are_refused_at_the_call(tiny_sd1, bad):
    sd = StableDiffusion(str(tiny_sd1))
    with pytest.raises(ValueError):
        sd.generate_latents("a cat", num_steps=1, **bad)


def test_a_prompt_lora_is_merged_for_its_generation_only(tiny_sd1, tmp_path):
    """``<lora:style:0.8>``: diffusers with that LoRA merged at 0.8 on the prompt without the tag; the weights come back after."""
    pipe = reference_pipeline(tiny_sd1, "EulerDiscreteScheduler")
    lora = lora_files.random_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, seed=5)
    lora_files.write_kohya(tmp_path / "style.safetensors", lora)
    (tmp_path / "unet_only").mkdir()
    unet_only = lora_files.write_kohya(tmp_path / "unet_only" / "style.safetensors", lora, {"unet"})

    sd = StableDiffusion(str(tiny_sd1), sampler="euler")
    weights = lambda: {k: np.array(v) for k, v in tree_flatten(sd.text_encoder.parameters()) + tree_flatten(sd.unet.parameters())}  # noqa: E731
    before, init = weights(), _init(4)
    ours = run_latents(sd.generate_latents("a cat <lora:style:0.8>", num_steps=3, cfg_weight=5.0, latents=nhwc(init), lora_dir=str(tmp_path)))[-1]
    after = weights()
    assert all(np.array_equal(before[k], after[k]) for k in before), "the LoRA stayed merged after its generation"
    assert sd.loras == []

    pipe.load_lora_weights(str(unet_only), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    lora_files.merge_into_torch(pipe.text_encoder, lora, "text_encoder", 0.8)
    ref = pipe("a cat", num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE, latents=init.clone(), output_type="latent").images
    assert relative_error(ours, nhwc(ref)) <= 1e-4


def test_the_cli_writes_clip_skip_ti_and_lora_hashes_as_a1111_does(tiny_sd1, tmp_path, capsys):
    """A1111's infotext: ``Clip skip: 2``, ``TI hashes: "name: sha256[:12] of the file"``, ``Lora hashes:
    "name: addnet hash[:12]"`` (the sha256 of the safetensors data after its header); -v counts the tokens."""
    import hashlib
    import json
    import struct

    import ti_files
    from transformers import CLIPTokenizer

    from stable_diffusion import images
    from stable_diffusion.scripts import txt2image

    dims = json.loads((tiny_sd1 / "text_encoder" / "config.json").read_text())["hidden_size"]
    embedding = ti_files.write_a1111_sd(tmp_path / "EasyNegative.safetensors", ti_files.random_vectors(2, dims))
    pipe = reference_pipeline(tiny_sd1)
    (tmp_path / "loras").mkdir()
    lora = lora_files.write_kohya(tmp_path / "loras" / "style.safetensors", lora_files.random_lora({"unet": pipe.unet}, seed=6))
    out = tmp_path / "out.png"
    prompt = "a (cat:1.2) <lora:style:0.5>"
    txt2image.main(
        [prompt, "--model", str(tiny_sd1), "--negative_prompt", "EasyNegative, blurry", "--cfg", "5", "--embedding", str(embedding),
         "--lora-dir", str(tmp_path / "loras"), "--clip-skip", "2", "--steps", "2", "--width", "32", "--height", "32", "--seed", "1",
         "--no-float16", "--sampler", "euler", "-v", "-o", str(out)]
    )  # fmt: skip
    p = images.parse_parameters(images.read_parameters(out))
    data = lora.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    assert p["Prompt"] == prompt and p["Negative prompt"] == "EasyNegative, blurry"
    assert p["Clip skip"] == "2"
    assert p["TI hashes"] == f"EasyNegative: {hashlib.sha256(embedding.read_bytes()).hexdigest()[:12]}"
    assert p["Lora hashes"] == f"style: {hashlib.sha256(data[8 + header :]).hexdigest()[:12]}"
    tokens = len(CLIPTokenizer.from_pretrained(tiny_sd1 / "tokenizer")("a cat", add_special_tokens=False).input_ids)
    assert f"prompt: {tokens} tokens in 1 chunk(s)" in capsys.readouterr().err


def test_a_missing_prompt_lora_stops_the_cli_before_loading(tiny_sd1, tmp_path, capsys):
    from stable_diffusion import cli
    from stable_diffusion.scripts import txt2image

    with pytest.raises(SystemExit) as exit:
        cli.run_cli(lambda: txt2image.main(["a cat <lora:gone:1>", "--model", str(tiny_sd1), "--lora-dir", str(tmp_path), "-o", str(tmp_path / "x.png")]), "sd-txt2image")
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "<lora:gone:1>" in err and "gone.safetensors" in err
    assert not (tmp_path / "x.png").exists()


def test_only_literal_syntax_drops_words_and_says_so(tiny_sd1, recwarn):
    sd = StableDiffusion(str(tiny_sd1), sampler="euler")
    long = "cat, " * 60  # 120 tokens: 2 chunks read whole with A1111 syntax
    run_latents(sd.generate_latents(long, num_steps=1, cfg_weight=0, latent_size=(8, 8), seed=0))
    assert not [w for w in recwarn if "dropped" in str(w.message)]
    with pytest.warns(UserWarning, match=r"the last 45 of 120 tokens .* were dropped"):
        run_latents(sd.generate_latents(long, num_steps=1, cfg_weight=0, latent_size=(8, 8), seed=0, prompt_syntax="none"))


def test_a_refused_call_with_a_prompt_lora_leaves_the_model_as_it_was(tiny_sd1, tmp_path):
    """A bad argument found with a <lora:...> tag in the prompt: nothing merged, nothing held (load_lora still works)."""
    pipe = reference_pipeline(tiny_sd1)
    lora_files.write_kohya(tmp_path / "style.safetensors", lora_files.random_lora({"unet": pipe.unet}, seed=7))
    sd = StableDiffusion(str(tiny_sd1))
    before = {k: np.array(v) for k, v in tree_flatten(sd.unet.parameters())}
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    with pytest.raises(ValueError, match="noise has shape"):
        sd.generate_latents_from_image(image, "a cat <lora:style:1>", num_steps=2, noise=mx.zeros((1, 3, 3, 4)), lora_dir=str(tmp_path))
    assert all(np.array_equal(before[k], np.array(v)) for k, v in tree_flatten(sd.unet.parameters()))
    sd.load_lora(tmp_path / "style.safetensors")  # no generation holds the weights
