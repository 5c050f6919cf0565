"""Read a ``.safetensors`` file only after the ``safetensors`` library has validated it.

MLX's reader (``mx.load``) takes files the format forbids and reads them wrong, without a word: a
header-length field one byte short (every tensor read one byte off), overlapping tensors or gaps,
float ``data_offsets``, a string ``__metadata__``, bytes past the last tensor. The ``safetensors``
library, the format's reference and a runtime dependency, parses and validates the header (JSON,
dtypes, shapes, offsets that tile the data exactly to the end of the file, a header under 100 MB)
without reading the data or needing the framework to support the dtypes, so every file passes
through it first; ``mx.load`` then reads the arrays (lazily: a tensor is read when first used).
"""

from pathlib import Path

import mlx.core as mx
from safetensors import SafetensorError, safe_open

from .errors import ModelLoadError, one_line

# The safetensors dtypes mx.load reads as themselves. It refuses F64 and reads the F8/F6/F4 kinds as
# raw uint8 bytes, which would load as numbers silently wrong.
MLX_DTYPES = {
    "BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16, "U32": mx.uint32,
    "I32": mx.int32, "U64": mx.uint64, "I64": mx.int64, "F16": mx.float16, "BF16": mx.bfloat16,
    "F32": mx.float32, "C64": mx.complex64,
}  # fmt: skip


def load(path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The arrays and the ``__metadata__`` of one ``.safetensors`` file, refused with a ModelLoadError
    naming the file and the fault where the ``safetensors`` library refuses it (or MLX cannot read a
    dtype as numbers)."""
    path = Path(path)
    if not path.is_file():  # also keeps a FIFO from blocking the open
        raise ModelLoadError(f"{path}: missing file (or not a regular file)")
    try:
        with safe_open(str(path), "numpy") as f:
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(one_line(f"{path}: not a valid safetensors file ({e}); download or save it again")) from None
    unreadable = sorted(f"{key} ({dtype})" for key, dtype in dtypes.items() if dtype not in MLX_DTYPES)
    if unreadable:
        raise ModelLoadError(
            f"{path}: tensor {unreadable[0]}{f' and {len(unreadable) - 1} more' if len(unreadable) > 1 else ''} "
            "has a dtype MLX cannot load as numbers; use an fp32, fp16 or bf16 file"
        )
    try:
        arrays = mx.load(str(path), format="safetensors")
    except Exception as e:  # the header passed; an I/O error or a file changed since
        raise ModelLoadError(one_line(f"{path}: not a readable safetensors file ({e})")) from None
    return arrays, metadata
