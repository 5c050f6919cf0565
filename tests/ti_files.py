"""Textual-inversion files written as the real trainers write them, for the tests.

- ``write_a1111_sd``: kohya's ``train_textual_inversion.py`` (and the converters of A1111's pickled
  ``.pt`` files): ``{"emb_params": (n, dims)}`` with the trainer's ``ss_*`` metadata.
- ``write_a1111_sdxl``: kohya's ``sdxl_train_textual_inversion.py``: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``.
- ``write_diffusers``: diffusers' ``examples/textual_inversion`` ``save_progress``:
  ``{placeholder_token: (n, dims)}`` with metadata ``{"format": "pt"}``, as ``learned_embeds.safetensors``.

``vectors`` are anything ``torch.as_tensor`` takes; ``dtype`` is the dtype written to the file.
"""

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

KOHYA_METADATA = {"ss_network_module": "textual_inversion", "ss_num_vectors_per_token": "", "ss_sd_model_name": "model.safetensors"}


def random_vectors(n: int, dims: int, seed: int = 0) -> np.ndarray:
    """(n, dims) float32 vectors of the size of CLIP token embeddings (std ~0.02)."""
    return (np.random.default_rng(seed).standard_normal((n, dims)) * 0.02).astype(np.float32)


def _tensor(vectors, dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(vectors)).to(dtype).contiguous()


def write_a1111_sd(path, vectors, dtype=torch.float32, key="emb_params") -> Path:
    """An SD 1.x/2.x embedding as kohya's trainer writes it (``key`` = another single key, e.g. ``string_to_param.*``)."""
    tensor = _tensor(vectors, dtype)
    save_file({key: tensor}, str(path), metadata=dict(KOHYA_METADATA, ss_num_vectors_per_token=str(tensor.shape[0])))
    return Path(path)


def write_a1111_sdxl(path, clip_l, clip_g, dtype=torch.float32) -> Path:
    """An SDXL embedding as kohya's SDXL trainer writes it: one row per vector for each text encoder."""
    tensors = {"clip_l": _tensor(clip_l, dtype), "clip_g": _tensor(clip_g, dtype)}
    save_file(tensors, str(path), metadata=dict(KOHYA_METADATA, ss_num_vectors_per_token=str(tensors["clip_g"].shape[0])))
    return Path(path)


def write_diffusers(path, token: str, vectors, dtype=torch.float32) -> Path:
    """A diffusers concept: ``{token: vectors}`` (n, dims), or (dims,) as older concepts hold one vector."""
    save_file({token: _tensor(vectors, dtype)}, str(path), metadata={"format": "pt"})
    return Path(path)
