"""CLIP text encoder (Radford et al. 2021), as Stable Diffusion conditions on it.

Follows transformers' ``CLIPTextModel`` and ``CLIPTextModelWithProjection``
(transformers/models/clip/modeling_clip.py): pre-norm transformer layers with a causal mask,
a final LayerNorm, the pooled state taken at the end-of-text token, and for SDXL's second
encoder a bias-free projection of that pooled state.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import CLIPTextModelConfig


@dataclass
class CLIPOutput:
    last_hidden_state: mx.array  # (B, L, D), after final_layer_norm
    pooled_output: mx.array  # (B, D), last_hidden_state at the end-of-text token
    hidden_states: list  # embeddings output, then each layer's output (not normalised)
    text_embeds: Optional[mx.array]  # text_projection(pooled_output), or None


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.gelu, "quick_gelu": quick_gelu}


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, D = x.shape
        heads = lambda t: t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, Dh)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, D)  # (B, L, D)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    """fc1, activation, fc2."""

    def __init__(self, dims: int, hidden_dims: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, dims)
        self.act = ACTIVATIONS[hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, config: CLIPTextModelConfig):
        super().__init__()
        dims = config.model_dims
        # mx.fast.layer_norm accumulates its statistics in float32 also for float16 inputs.
        self.layer_norm1 = nn.LayerNorm(dims, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(dims, config.num_heads)
        self.layer_norm2 = nn.LayerNorm(dims, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(dims, config.intermediate_size, config.hidden_act)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextModelConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.model_dims)
        self.position_embedding = nn.Embedding(config.max_length, config.model_dims)

    def __call__(self, input_ids: mx.array, token_embeds: Optional[mx.array] = None) -> mx.array:
        L = input_ids.shape[-1]
        max_length = self.position_embedding.weight.shape[0]
        if L > max_length:
            raise ValueError(f"sequence length {L} exceeds the {max_length} position embeddings")
        if token_embeds is None:
            token_embeds = self.token_embedding(input_ids)
        return token_embeds + self.position_embedding(mx.arange(L))


class CLIPEncoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(self, config: CLIPTextModelConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_layers)]


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder layers and the final LayerNorm (transformers' ``text_model``)."""

    def __init__(self, config: CLIPTextModelConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.model_dims, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder; with ``config.projection_dim`` set, also ``CLIPTextModelWithProjection``."""

    def __init__(self, config: CLIPTextModelConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.model_dims, config.projection_dim, bias=False)

    def __call__(self, input_ids: mx.array, token_embeds: Optional[mx.array] = None) -> CLIPOutput:
        """``token_embeds`` (B, L, D): the token embeddings to use instead of looking ``input_ids`` up
        (textual-inversion vectors written into some rows); ``input_ids`` still place the pooled state."""
        B, L = input_ids.shape
        x = self.text_model.embeddings(input_ids, token_embeds)  # (B, L, D)

        # Additive causal mask; the most negative finite value of the dtype (as transformers'
        # eager path) keeps float16 free of NaN: the diagonal is never masked.
        future = mx.triu(mx.ones((L, L), dtype=mx.bool_), k=1)
        mask = mx.where(future, mx.array(mx.finfo(x.dtype).min, x.dtype), mx.array(0, x.dtype))

        hidden_states = [x]
        for layer in self.text_model.encoder.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        last_hidden_state = self.text_model.final_layer_norm(x)

        if self.config.eos_token_id == 2:
            # Configs from before transformers PR #24773 carry eos_token_id 2; transformers then
            # pools at the largest token id, which is the end-of-text token in CLIP's vocabulary.
            eos = mx.argmax(input_ids, axis=-1)
        else:
            # The first end-of-text token: SD 1 pads with the same token.
            eos = mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)
        pooled_output = last_hidden_state[mx.arange(B), eos]  # (B, D)

        text_embeds = self.text_projection(pooled_output) if "text_projection" in self else None
        return CLIPOutput(last_hidden_state, pooled_output, hidden_states, text_embeds)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        sanitized = {}
        for key, value in weights.items():
            if key.endswith("embeddings.position_ids"):
                continue  # a buffer (arange), not a parameter
            # transformers >= 5 saves CLIPTextModel without the "text_model." prefix that the
            # Hub's checkpoints (and CLIPTextModelWithProjection) use.
            if not key.startswith(("text_model.", "text_projection.")):
                key = "text_model." + key
            sanitized[key] = value
        return sanitized
