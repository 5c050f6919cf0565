"""Parity of stable_diffusion.clip with transformers' CLIPTextModel / CLIPTextModelWithProjection."""

import mlx.core as mx
import numpy as np
import pytest
import torch
import tiny_models
from parity import relative_error
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection

from stable_diffusion import model_io
from stable_diffusion.clip import CLIPTextModel
from stable_diffusion.config import CLIPTextModelConfig

BOS, EOS = 49406, 49407


def token_rows(pad: int, eos_positions=(5, 1, 40, 76), seed: int = 0) -> np.ndarray:
    """Rows of 77 ids: BOS, random words, EOS at a different place per row, then padding."""
    rng = np.random.default_rng(seed)
    rows = np.full((len(eos_positions), 77), pad, dtype=np.int32)
    for row, eos in zip(rows, eos_positions):
        row[0] = BOS
        row[1:eos] = rng.integers(0, 49406, eos - 1)
        row[eos] = EOS
    return rows


def reference(folder, ids: np.ndarray, cls=HFCLIPTextModel):
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids).long(), output_hidden_states=True)


def ours(root, ids: np.ndarray, dtype=mx.float32):
    model = model_io.load_component(root, "text_encoder", CLIPTextModel, CLIPTextModelConfig, dtype)
    return model(mx.array(ids))


@pytest.mark.parametrize("flavour, pad", [("sd1", EOS), ("sd2", 0)])
def test_text_encoder_matches_transformers_with_eos_at_any_position(flavour, pad, request):
    root = request.getfixturevalue(f"tiny_{flavour}")
    ids = token_rows(pad)
    ref = reference(root / "text_encoder", ids)
    out = ours(root, ids)

    assert len(out.hidden_states) == len(ref.hidden_states)
    assert relative_error(out.last_hidden_state, ref.last_hidden_state) <= 1e-5
    assert relative_error(out.pooled_output, ref.pooler_output) <= 1e-5
    assert relative_error(out.hidden_states[-2], ref.hidden_states[-2]) <= 1e-5
    assert relative_error(out.hidden_states[0], ref.hidden_states[0]) <= 1e-5
    assert out.text_embeds is None


def test_pooled_output_uses_the_first_eos_when_padding_is_eos(tiny_sd1):
    ids = token_rows(EOS, eos_positions=(3, 10))
    out = ours(tiny_sd1, ids)
    expected = np.stack([np.array(out.last_hidden_state[0, 3]), np.array(out.last_hidden_state[1, 10])])
    np.testing.assert_array_equal(np.array(out.pooled_output), expected)


def test_legacy_eos_token_id_2_pools_at_the_largest_id(tmp_path):
    torch.manual_seed(1)
    config = tiny_models.text_encoder_config(num_hidden_layers=2)
    config.eos_token_id = 2
    hf = HFCLIPTextModel(config)
    tiny_models._randomize(hf)
    hf.save_pretrained(tmp_path / "text_encoder")
    ids = token_rows(0, eos_positions=(7, 30))
    ids[1, 30], ids[1, 12] = 100, 49405  # no EOS: the legacy rule still pools at the largest id
    ref = reference(tmp_path / "text_encoder", ids)
    out = ours(tmp_path, ids)
    assert relative_error(out.pooled_output, ref.pooler_output) <= 1e-5


def test_projection_model_matches_transformers_text_embeds(tmp_path):
    torch.manual_seed(2)
    hf = HFCLIPTextModelWithProjection(tiny_models.text_encoder_config("gelu", projection_dim=24))
    tiny_models._randomize(hf)
    hf.save_pretrained(tmp_path / "text_encoder")
    ids = token_rows(0)
    ref = reference(tmp_path / "text_encoder", ids, HFCLIPTextModelWithProjection)
    out = ours(tmp_path, ids)

    assert out.text_embeds.shape == (len(ids), 24)
    assert relative_error(out.text_embeds, ref.text_embeds) <= 1e-5
    assert relative_error(out.last_hidden_state, ref.last_hidden_state) <= 1e-5
    assert relative_error(out.hidden_states[-2], ref.hidden_states[-2]) <= 1e-5


def test_sanitize_drops_position_ids_and_reads_hub_prefixed_keys(tiny_sd1):
    config = CLIPTextModelConfig.from_dict(model_io.read_config(tiny_sd1, "text_encoder"))
    model = CLIPTextModel(config)
    weights, _ = model_io.load_safetensors([tiny_sd1 / "text_encoder" / "model.safetensors"])
    # The Hub's SD checkpoints spell every key with "text_model." and often keep position_ids.
    hub = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in weights.items()}
    hub["text_model.embeddings.position_ids"] = mx.arange(77)[None]
    model_io.load_weights_strict(model, model.sanitize(hub), "hub-style weights")


@pytest.mark.parametrize("flavour, pad", [("sd1", EOS), ("sd2", 0)])
def test_float16_text_encoder_is_finite_and_close_to_float32_reference(flavour, pad, request):
    root = request.getfixturevalue(f"tiny_{flavour}")
    ids = token_rows(pad)
    ref = reference(root / "text_encoder", ids)
    out = ours(root, ids, dtype=mx.float16)

    assert out.last_hidden_state.dtype == mx.float16
    for ours_x, ref_x in [
        (out.last_hidden_state, ref.last_hidden_state),
        (out.pooled_output, ref.pooler_output),
        (out.hidden_states[-2], ref.hidden_states[-2]),
    ]:
        assert mx.all(mx.isfinite(ours_x)).item()
        assert relative_error(ours_x, ref_x) <= 1e-2
