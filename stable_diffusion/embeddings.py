"""Textual-inversion embeddings from ``.safetensors`` files, read as AUTOMATIC1111 and diffusers read them.

A1111 (modules/textual_inversion/textual_inversion.py, ``create_embedding_from_data`` on what
``safetensors.torch.load_file`` returns) and diffusers (loaders/textual_inversion.py,
``_retrieve_tokens_and_embeddings``) accept two layouts of a safetensors file:

- SDXL: ``clip_l`` (n, 768) and ``clip_g`` (n, 1280), one row per vector for each text encoder
  (kohya's ``sdxl_train_textual_inversion.py`` writes exactly these two keys).
- One tensor, whatever its key: (n, dims), or (dims,) for one vector. kohya's SD 1/2 trainer and
  the converters of A1111's pickled ``.pt`` files write ``emb_params``; diffusers' trainer writes
  ``{placeholder_token: (n, dims)}`` (older concepts a (dims,) vector); a conversion that flattened
  A1111's ``string_to_param`` dict writes ``string_to_param.*``. (A1111's own ``string_to_param``
  branch only ever matches its pickles, which this library never opens.)

The word that calls the embedding in a prompt is ``token`` or, as A1111 names it, the file name
without its extension; diffusers names it by the file's key, which can be passed as ``token``.
"""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import safetensors_io
from .checkpoint import PICKLE_SUFFIXES
from .errors import ModelLoadError
from .file_hash import file_sha256

SDXL_KEYS = ("clip_l", "clip_g")  # in the model's encoder order: CLIP ViT-L, then OpenCLIP ViT-bigG
MAX_VECTORS = 75  # A1111 never splits an embedding across chunks, and a chunk holds 75 tokens
_FAMILIES = {(768,): "SD 1.x", (1024,): "SD 2.x", (768, 1280): "SDXL"}  # text encoders' widths


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding: the prompt word and its vectors for each text encoder."""

    name: str
    vectors: tuple[np.ndarray, ...]  # float32 (n_vectors, dims), one per text encoder, in the model's order
    hash: str  # what A1111 writes for it in ``TI hashes``
    path: str


def load_embedding(path, token: str | None = None) -> Embedding:
    """Read a textual-inversion ``.safetensors`` file; a ModelLoadError names the file and what is wrong."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: a pickled embedding file; this library reads safetensors only and never unpickles. "
            "Use the .safetensors version of the embedding"
        )
    name = path.stem if token is None else token
    if not name.strip():
        raise ValueError(f"token={token!r}: the word that calls an embedding in a prompt cannot be empty")
    arrays, _ = safetensors_io.load(path)
    if set(SDXL_KEYS) <= set(arrays):
        if extra := sorted(set(arrays) - set(SDXL_KEYS)):
            raise ModelLoadError(f"{path}: an SDXL embedding holds clip_l and clip_g only, not also {', '.join(extra)}")
        vectors = tuple(_vectors(path, key, arrays[key]) for key in SDXL_KEYS)
        if vectors[0].shape[0] != vectors[1].shape[0]:
            raise ModelLoadError(
                f"{path}: clip_l has {vectors[0].shape[0]} vectors and clip_g {vectors[1].shape[0]}; "
                "an SDXL embedding has as many for each text encoder"
            )
    elif len(arrays) == 1:
        [(key, value)] = arrays.items()
        vectors = (_vectors(path, key, value),)
    else:
        keys = ", ".join(sorted(arrays)[:8]) + (", ..." if len(arrays) > 8 else "") or "none"
        raise ModelLoadError(
            f"{path}: not a textual-inversion embedding (keys: {keys}); expected one tensor "
            "(emb_params or a diffusers token) or SDXL's clip_l and clip_g"
        )
    # A1111's TI hash: the sha256 of the whole file (hashes.sha256, not kohya's addnet hash), cut
    # to 12 hex digits (Embedding.set_hash: ``shorthash = hash[0:12]``).
    return Embedding(name, vectors, file_sha256(path)[:12], str(path))


def _vectors(path: Path, key: str, value: mx.array) -> np.ndarray:
    """One encoder's vectors as float32 (n, dims); a (dims,) tensor is one vector, as A1111 and diffusers read it."""
    if not mx.issubdtype(value.dtype, mx.floating):
        raise ModelLoadError(f"{path}: {key} is {str(value.dtype).removeprefix('mlx.core.')}; embedding vectors are fp32, fp16 or bf16")
    n_vectors = value.shape[0] if value.ndim == 2 else 1
    if value.ndim not in (1, 2) or not 1 <= n_vectors <= MAX_VECTORS or value.shape[-1] == 0:
        raise ModelLoadError(
            f"{path}: {key} has shape {tuple(value.shape)}; expected (n, dims) with 1 to {MAX_VECTORS} vectors "
            "(a prompt chunk holds 75 tokens and an embedding is never split)"
        )
    vectors = np.array(value.astype(mx.float32)).reshape(-1, value.shape[-1])
    if not np.isfinite(vectors).all():
        raise ModelLoadError(f"{path}: {key} holds inf or NaN")
    return vectors


def check_fits(embedding: Embedding, dims: tuple[int, ...]) -> None:
    """Raise ValueError unless the embedding has vectors for exactly the model's text encoders and widths."""
    have = tuple(v.shape[1] for v in embedding.vectors)
    if have != tuple(dims):
        raise ValueError(
            f"{embedding.path}: an embedding for text encoders of width {_widths(have)}; "
            f"this model's text encoders are {_widths(tuple(dims))}"
        )


def _widths(dims: tuple[int, ...]) -> str:
    family = _FAMILIES.get(dims)
    return " and ".join(map(str, dims)) + (f" ({family})" if family else "")


def infotext_hashes(embeddings) -> str:
    """The value of A1111's ``TI hashes`` infotext field, unquoted: ``name: hash, name: hash``, each
    name with ":" and "," removed (sd_hijack_clip.py, ``forward``)."""
    clean = str.maketrans("", "", ":,")
    return ", ".join(f"{e.name.translate(clean)}: {e.hash}" for e in embeddings)
