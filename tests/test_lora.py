"""LoRA parity: kohya and diffusers/PEFT files merged by stable_diffusion.lora vs diffusers' load_lora_weights.

The UNet reference is diffusers' ``load_lora_weights`` + ``set_adapters`` (PEFT side paths). With
transformers 5.24 and peft 0.21.2 diffusers cannot load text-encoder LoRAs (transformers' adapter
loading re-initialises the encoder), so the text encoders' reference is the LoRA merged by hand
into the transformers model: W + scale * alpha / r * up @ down.
"""

import hashlib
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import lora_files
from parity import nhwc, relative_error
from stable_diffusion import ModelLoadError, load_model
from stable_diffusion import lora as sdlora

SIZE = 32  # pixels; the tiny VAE downsamples 4x
PROMPT = "A photo of an astronaut riding a horse on Mars."


def models_of(sd) -> dict:
    models = {"unet": sd.unet, "text_encoder": sd.text_encoder}
    if hasattr(sd, "text_encoder_2"):
        models["text_encoder_2"] = sd.text_encoder_2
    return models


def weights_of(models: dict) -> dict:
    flat = {f"{c}.{k}": v for c, m in models.items() for k, v in tree_flatten(m.parameters())}
    mx.eval(flat)
    return flat


def reference_pipe(folder, xl: bool):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    kwargs = {} if xl else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(folder, **kwargs)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def torch_models(pipe) -> dict:
    names = ("unet", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def run_both(folder, xl, loras):
    """loras: [(random lora, our file, UNet-only file for diffusers, scale)] -> (ours, reference, ours without LoRA) images."""
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(3))
    common = dict(num_steps=3, cfg_weight=5.0, negative_text="blurry", latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init))

    sd = load_model(str(folder), sampler="euler")  # the reference runs Euler (reference_pipe)
    plain = sd.decode(list(sd.generate_latents(PROMPT, **common))[-1])
    for _, path, _, scale in loras:
        sd.load_lora(path, scale)
    ours = sd.decode(list(sd.generate_latents(PROMPT, **common))[-1])

    pipe = reference_pipe(folder, xl)
    for i, (_, _, unet_path, _) in enumerate(loras):
        pipe.load_lora_weights(str(unet_path), adapter_name=f"lora{i}")
    pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=[scale for *_, scale in loras])
    for lora, _, _, scale in loras:
        for component in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, component, None) is not None:
                lora_files.merge_into_torch(getattr(pipe, component), lora, component, scale)
    ref = pipe(
        PROMPT, negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE, latents=init.clone(), output_type="np"
    ).images
    return np.array(ours), ref, np.array(plain)


@pytest.fixture(scope="module")
def sd1_loras(tiny_sd1, tmp_path_factory):
    """A kohya file and a PEFT file (each UNet + text encoder, with conv LoRA), and UNet-only copies for diffusers."""
    folder = tmp_path_factory.mktemp("sd1_loras")
    torch_pipe = reference_pipe(tiny_sd1, xl=False)
    kohya = lora_files.random_lora(torch_models(torch_pipe), seed=1)
    peft = lora_files.random_lora(torch_models(torch_pipe), seed=2, rank=3, alpha=6.0, conv_rank=4, conv_alpha=2.0)
    return [
        (kohya, lora_files.write_kohya(folder / "style_a.safetensors", kohya), lora_files.write_kohya(folder / "a_unet.safetensors", kohya, {"unet"}), 0.8),
        (peft, lora_files.write_peft(folder / "style_b.safetensors", peft), lora_files.write_peft(folder / "b_unet.safetensors", peft, {"unet"}), -0.6),
    ]


@pytest.fixture(scope="module")
def sdxl_loras(tiny_sdxl, tmp_path_factory):
    """SDXL: kohya with SGM UNet names and te1/te2, and PEFT with text_encoder_2 keys."""
    folder = tmp_path_factory.mktemp("sdxl_loras")
    torch_pipe = reference_pipe(tiny_sdxl, xl=True)
    lpb = torch_pipe.unet.config.layers_per_block
    kohya = lora_files.random_lora(torch_models(torch_pipe), seed=3)
    peft = lora_files.random_lora(torch_models(torch_pipe), seed=4, rank=2, alpha=1.0)
    return [
        (
            kohya,
            lora_files.write_kohya(folder / "xl_a.safetensors", kohya, sgm_layers_per_block=lpb),
            lora_files.write_kohya(folder / "xl_a_unet.safetensors", kohya, {"unet"}, sgm_layers_per_block=lpb),
            1.2,
        ),
        (peft, lora_files.write_peft(folder / "xl_b.safetensors", peft), lora_files.write_peft(folder / "xl_b_unet.safetensors", peft, {"unet"}), 0.5),
    ]


def test_sd1_kohya_and_peft_loras_at_two_scales_match_diffusers(tiny_sd1, sd1_loras):
    ours, ref, plain = run_both(tiny_sd1, False, sd1_loras)
    assert relative_error(plain, ref) > 1e-2  # the LoRAs change the picture well beyond the tolerance
    assert relative_error(ours, ref) <= 1e-4


def test_sdxl_kohya_sgm_and_peft_loras_with_both_encoders_match_diffusers(tiny_sdxl, sdxl_loras):
    ours, ref, plain = run_both(tiny_sdxl, True, sdxl_loras)
    assert relative_error(plain, ref) > 1e-2
    assert relative_error(ours, ref) <= 1e-4


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
def test_every_pair_lands_on_its_layer_and_unload_restores_the_weights_bit_for_bit(request, flavour):
    folder = request.getfixturevalue(f"tiny_{flavour}")
    loras = request.getfixturevalue(f"{flavour}_loras")
    sd = load_model(str(folder))
    models = models_of(sd)
    original = weights_of(models)
    applied = [sdlora.apply(models, sdlora.load(path), scale) for _, path, _, scale in loras]
    merged = weights_of(models)
    changed = {k for k in original if not np.array_equal(np.array(original[k]), np.array(merged[k]))}
    targets = {f"{c}.{p}.weight" for a in applied for c, p, _, _ in a.originals}
    assert changed == targets
    assert len(targets) == len({(c, n) for lora, *_ in loras for c, n in lora})  # one layer per pair, none missed

    sdlora.unapply(models, applied)
    fresh = weights_of(models_of(load_model(str(folder))))
    restored = weights_of(models)
    assert restored.keys() == fresh.keys()
    for key in fresh:
        assert restored[key].dtype == fresh[key].dtype
        assert np.array_equal(np.array(restored[key]), np.array(fresh[key])), key


def test_old_diffusers_spellings_parse_to_the_same_pairs_as_peft_keys(sd1_loras, tmp_path):
    peft_lora, peft_path, _, _ = sd1_loras[1]
    old_path = lora_files.write_peft(tmp_path / "old.safetensors", peft_lora, spelling="old")
    assert any(".processor.to_q_lora.down." in k for k in mx.load(str(old_path)))
    assert any(".self_attn.to_q_lora.down." in k for k in mx.load(str(old_path)))
    peft, old = sdlora.load(peft_path).pairs, sdlora.load(old_path).pairs
    assert set(old) == set(peft)
    for target, pair in old.items():
        assert np.array_equal(np.array(pair.down), np.array(peft[target].down))
        assert np.array_equal(np.array(pair.up), np.array(peft[target].up))
        assert pair.alpha == pair.rank  # no metadata: alpha = r, as diffusers assumes


def test_unknown_keys_and_missing_layers_raise_naming_them_and_apply_nothing(tiny_sd1, tmp_path):
    from safetensors.torch import save_file

    sd = load_model(str(tiny_sd1))
    models = models_of(sd)
    before = weights_of(models)
    good = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, 1, 1), "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, 1, 1)}

    save_file({**good, "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.randn(2, 2)}, str(tmp_path / "lycoris.safetensors"))
    with pytest.raises(ModelLoadError, match=r"lora_unet_down_blocks_0_attentions_0_proj_in\.hada_w1_a.*LyCORIS"):
        sdlora.load(tmp_path / "lycoris.safetensors")

    missing = {"lora_unet_down_blocks_7_attentions_0_to_q.lora_down.weight": torch.randn(2, 32), "lora_unet_down_blocks_7_attentions_0_to_q.lora_up.weight": torch.randn(32, 2)}
    save_file({**good, **missing}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match=r"unet:down_blocks_7_attentions_0_to_q.*nothing was applied"):
        sdlora.apply(models, sdlora.load(tmp_path / "missing.safetensors"), 1.0)

    wrong = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 48, 1, 1), "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, 1, 1)}
    save_file(wrong, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ModelLoadError, match=r"down_blocks_0_attentions_0_proj_in \(LoRA \(32, 48, 1, 1\) vs weight \(32, 32, 1, 1\)\)"):
        sdlora.apply(models, sdlora.load(tmp_path / "shape.safetensors"), 1.0)

    te2 = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 32), "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(37, 2)}
    save_file({**good, **te2}, str(tmp_path / "xl_on_sd1.safetensors"))
    with pytest.raises(ModelLoadError, match="text_encoder_2, which this model does not have"):
        sdlora.apply(models, sdlora.load(tmp_path / "xl_on_sd1.safetensors"), 1.0)

    after = weights_of(models)
    assert all(np.array_equal(np.array(before[k]), np.array(after[k])) for k in before)


def test_pickled_lora_files_are_refused_unread(tmp_path):
    path = tmp_path / "style.ckpt"
    path.write_bytes(b"not even read")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        sdlora.load(path)
    with pytest.raises(ModelLoadError, match="no such LoRA file"):
        sdlora.load(tmp_path / "absent.safetensors")


def test_quantized_layers_are_refused(tiny_sd1, sd1_loras):
    sd = load_model(str(tiny_sd1))
    sd.quantize(text_bits=8, unet_bits=8, group_size=32)
    assert isinstance(sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, nn.QuantizedLinear)
    with pytest.raises(ModelLoadError, match="quantized; load LoRAs before quantize"):
        sdlora.apply(models_of(sd), sdlora.load(sd1_loras[0][1]), 1.0)


def test_a1111_hash_is_the_addnet_sha256_after_the_header(tmp_path):
    from safetensors.torch import save_file

    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3)}
    save_file(tensors, str(tmp_path / "My, Style: v2.safetensors"), metadata={"ss_output_name": "a"})
    save_file(tensors, str(tmp_path / "same.safetensors"), metadata={"ss_output_name": "another, longer name"})
    data = (tmp_path / "same.safetensors").read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little") :]
    expected = hashlib.sha256(body).hexdigest()[:12]
    assert sdlora.short_hash(tmp_path / "same.safetensors") == expected
    assert sdlora.short_hash(tmp_path / "My, Style: v2.safetensors") == expected  # the metadata is not hashed
    assert sdlora.a1111_name(tmp_path / "My, Style: v2.safetensors") == "My, Style: v2"
    assert sdlora.infotext_hashes([tmp_path / "My, Style: v2.safetensors", tmp_path / "same.safetensors"]) == f"My Style v2: {expected}, same: {expected}"

    save_file(tensors, str(tmp_path / "trained.safetensors"), metadata={"sshs_model_hash": "abcdef0123456789" * 4})
    assert sdlora.short_hash(tmp_path / "trained.safetensors") == "abcdef012345"  # the trainer's stored hash wins, as in A1111


def test_peft_alpha_patterns_from_the_adapter_metadata(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "unet.a.to_q.lora_A.weight": torch.ones(4, 3), "unet.a.to_q.lora_B.weight": torch.ones(5, 4),
        "unet.a.to_k.lora_A.weight": torch.ones(2, 3), "unet.a.to_k.lora_B.weight": torch.ones(5, 2),
    }  # fmt: skip
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"a.to_k": 2}, "unet.alpha_pattern": {"to_k": 1}}
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata={"lora_adapter_metadata": json.dumps(config)})
    pairs = sdlora.load(tmp_path / "p.safetensors").pairs
    assert (pairs[("unet", "a.to_q")].alpha, pairs[("unet", "a.to_q")].rank) == (8, 4)
    assert (pairs[("unet", "a.to_k")].alpha, pairs[("unet", "a.to_k")].rank) == (1, 2)
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    assert sdlora.load(tmp_path / "plain.safetensors").pairs[("unet", "a.to_k")].alpha == 2  # alpha = r without metadata


def test_facade_load_lora_stacks_and_unload_loras_restores_bit_for_bit(tiny_sdxl, sdxl_loras):
    sd = load_model(str(tiny_sdxl))
    original = weights_of(models_of(sd))
    for _, path, _, scale in sdxl_loras:
        sd.load_lora(path, scale)
    assert [s for _, s in sd.loras] == [scale for *_, scale in sdxl_loras]
    sd.unload_loras()
    restored = weights_of(models_of(sd))
    assert sd.loras == [] and all(np.array_equal(np.array(original[k]), np.array(restored[k])) for k in original)
    sd.quantize(group_size=32)
    with pytest.raises(ValueError, match="before quantize"):
        sd.load_lora(sdxl_loras[0][1])


def test_peft_use_rslora_scales_by_alpha_over_sqrt_r_as_peft_does(tmp_path):
    """diffusers' loader with the file's own adapter metadata (use_rslora, per-module alpha and rank
    patterns) builds peft LoRA layers; each layer's ``scaling`` (alpha / sqrt(r) under rsLoRA) is the
    factor we merge ``up @ down`` with, alpha / r of the parsed pair."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    lora = lora_files.random_lora({"unet": unet}, seed=5, rank=4, alpha=6.0, conv_rank=2, conv_alpha=3.0)
    plain = lora_files.write_peft(tmp_path / "plain.safetensors", lora)
    with safe_open(str(plain), "numpy") as f:
        metadata = f.metadata()
    config = {**json.loads(metadata["lora_adapter_metadata"]), "unet.use_rslora": True}
    path = tmp_path / "rslora.safetensors"
    save_file(load_file(str(plain)), str(path), metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})

    state_dict, _, adapter_metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    unet.load_lora_adapter(state_dict, prefix="unet", adapter_name="rs", metadata=adapter_metadata)
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}
    pairs = sdlora.load(path).pairs
    assert set(layers) == {name for _, name in pairs} and all(m.use_rslora["rs"] for m in layers.values())
    for name, layer in layers.items():
        pair = pairs[("unet", name)]
        assert pair.rank == layer.r["rs"]
        # Both in float64: alpha * r / sqrt(r) / r and alpha / sqrt(r) differ by a few rounding steps.
        assert pair.alpha / pair.rank == pytest.approx(layer.scaling["rs"], rel=1e-12)
        assert layer.scaling["rs"] != pytest.approx(layer.lora_alpha["rs"] / layer.r["rs"])  # rsLoRA differs from alpha / r here
