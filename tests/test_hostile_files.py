"""Hostile model and LoRA files (issue 23): refused with one clear line, in bounded time, or read right.

Every malformed ``.safetensors`` file is crafted here from a valid one written by the ``safetensors``
library, and the library itself is the reference: a file it refuses is refused by every loader of the
package (model weights, LoRA files) with a ModelLoadError naming the file; a file it accepts loads to
the same tensors it reads.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as reference_load
from safetensors.torch import save_file

from stable_diffusion import ModelLoadError, model_io, safetensors_io
from stable_diffusion import lora as sdlora

# The library sorts by dtype then name: "a" holds bytes [0, 24), "b" [24, 32).
TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.arange(4, dtype=torch.float16)}


def valid_parts(tmp_path) -> tuple[dict, bytes]:
    """(header, data) of a valid file as the safetensors library writes it."""
    save_file(TENSORS, str(tmp_path / "valid.safetensors"), metadata={"format": "pt"})
    data = (tmp_path / "valid.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def file_bytes(header, body: bytes, length=None) -> bytes:
    """A safetensors layout: little-endian u64 header length, the header padded with spaces to 8 bytes
    (as the library pads it), the data. ``length`` overrides the length field."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return (len(text) if length is None else length).to_bytes(8, "little") + text + body


def one_short(header, body):
    text = json.dumps(header, separators=(",", ":")).encode()
    assert -len(text) % 8 > 0  # padded: one byte short still parses, and every tensor is read one byte off
    return file_bytes(text, body, length=len(text) + (-len(text) % 8) - 1)


def changed(header, name, **fields):
    return {**header, name: {**header[name], **fields}}


def duplicate_last(header, name, entry) -> bytes:
    """The header with ``name`` given twice, ``entry`` last (JSON readers keep the last)."""
    return json.dumps(header, separators=(",", ":")).encode()[:-1] + b',"' + name.encode() + b'":' + json.dumps(entry).encode() + b"}"


MALFORMED = {
    "header length one byte short": one_short,
    "overlapping tensors": lambda h, b: file_bytes(changed(h, "b", data_offsets=[16, 24]), b[:24]),
    "float data_offsets": lambda h, b: file_bytes(changed(h, "a", data_offsets=[0.0, 24.0]), b),
    "string __metadata__": lambda h, b: file_bytes({**h, "__metadata__": "pt"}, b),
    "non-string __metadata__ value": lambda h, b: file_bytes({**h, "__metadata__": {"format": 1}}, b),
    "offsets past the end": lambda h, b: file_bytes(h, b[:24]),
    "bytes after the last tensor": lambda h, b: file_bytes(h, b + bytes(8)),
    "dtype does not match the size": lambda h, b: file_bytes(changed(h, "a", dtype="F16"), b),
    "shape does not match the size": lambda h, b: file_bytes(changed(h, "a", shape=[2, 2]), b),
    "negative shape": lambda h, b: file_bytes(changed(h, "a", shape=[-2, -3]), b),
    "unknown dtype": lambda h, b: file_bytes(changed(h, "a", dtype="F128"), b),
    "duplicate key leaving bytes uncovered": lambda h, b: file_bytes(duplicate_last(h, "a", {**h["a"], "shape": [3], "data_offsets": [0, 12]}), b),
    "header length past the end of the file": lambda h, b: file_bytes(h, b, length=10_000),
    "header over 100 MB": lambda h, b: file_bytes(json.dumps(h).encode() + b" " * 100_000_000, b),
    "header not UTF-8": lambda h, b: file_bytes(json.dumps(h).encode()[:-1] + b',"\xff":{}}', b),
    "header not a JSON object": lambda h, b: file_bytes(b"[1, 2]", b""),
    "50,000-deep JSON in the header": lambda h, b: file_bytes(json.dumps(changed(h, "a", x=0)).encode().replace(b"0}", b"[" * 50_000 + b"]" * 50_000 + b"}", 1), b),
    "shorter than the length field": lambda h, b: b"\x10\x00\x00",
}

LOADERS = {
    "safetensors_io.load": safetensors_io.load,
    "model_io.load_safetensors": lambda path: model_io.load_safetensors([path]),
    "lora.load": sdlora.load,
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", MALFORMED)
def test_files_the_safetensors_library_refuses_are_refused_naming_the_file(tmp_path, case, loader):
    header, body = valid_parts(tmp_path)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED[case](header, body))
    with pytest.raises(SafetensorError):
        with safe_open(str(path), "numpy"):
            pass
    with pytest.raises(ModelLoadError) as error:
        LOADERS[loader](path)
    message = str(error.value)
    assert message.startswith(f"{path}: not a valid safetensors file (") and "\n" not in message


def test_the_one_byte_short_header_is_what_mlx_alone_reads_one_byte_off(tmp_path):
    """Why the library must come first: mx.load takes this file and returns garbage, not an error."""
    header, body = valid_parts(tmp_path)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(one_short(header, body))
    arrays = mx.load(str(path))
    assert not np.array_equal(np.array(arrays["a"]), TENSORS["a"].numpy())


def all_dtypes(tmp_path):
    tensors = {
        f"t_{dtype}": torch.arange(-3, 3).reshape(2, 3).to(dtype)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32, torch.int64, torch.complex64)
    }
    tensors.update({f"t_{dtype}": torch.arange(6).reshape(3, 2).to(dtype) for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool)})
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata={"format": "pt", "ss_note": "ünïcode"})


VALID = {
    "every dtype MLX reads, with metadata": all_dtypes,
    "bf16": lambda tmp: save_file({"w": torch.randn(4, 3).bfloat16()}, str(tmp / "f.safetensors")),
    "zero-size tensors": lambda tmp: save_file({"e": torch.zeros(0, 3), "f": torch.ones(2), "g": torch.zeros(4, 0).half()}, str(tmp / "f.safetensors")),
    "empty metadata": lambda tmp: save_file(TENSORS, str(tmp / "f.safetensors"), metadata={}),
    "no tensors at all": lambda tmp: save_file({}, str(tmp / "f.safetensors"), metadata={"format": "pt"}),
    "duplicate key, the last entry covering the data": lambda tmp: (tmp / "f.safetensors").write_bytes(
        file_bytes(duplicate_last({"a": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]}}, "a", {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}), TENSORS["a"].numpy().tobytes())
    ),
}


@pytest.mark.parametrize("case", VALID)
def test_files_the_safetensors_library_accepts_load_to_its_tensors_and_metadata(tmp_path, case):
    VALID[case](tmp_path)
    path = tmp_path / "f.safetensors"
    reference = reference_load(str(path))
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])

    arrays, metadata = safetensors_io.load(path)
    assert metadata == header.get("__metadata__", {})
    assert arrays.keys() == reference.keys()
    for key, ref in reference.items():
        ours = arrays[key]
        assert ours.shape == tuple(ref.shape)
        assert str(ours.dtype).removeprefix("mlx.core.") == str(ref.dtype).removeprefix("torch.")
        if ref.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 exactly
            ours, ref = ours.astype(mx.float32), ref.float()
        assert np.array_equal(np.array(ours), ref.numpy())


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "F64"])
def test_dtypes_mlx_cannot_read_as_numbers_are_refused_though_the_header_is_valid(tmp_path, dtype):
    path = tmp_path / "f8.safetensors"
    size = 8 if dtype == "F64" else 1
    path.write_bytes(file_bytes({"w": {"dtype": dtype, "shape": [2, 3], "data_offsets": [0, 6 * size]}}, bytes(6 * size)))
    with safe_open(str(path), "numpy") as f:
        assert f.get_slice("w").get_dtype() == dtype  # the library accepts the header
    with pytest.raises(ModelLoadError, match=rf"{path}: tensor w \({dtype}\) has a dtype MLX cannot load as numbers"):
        safetensors_io.load(path)


def test_a_fifo_or_folder_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    for name in ("pipe.safetensors", "folder.safetensors", "absent.safetensors"):
        with pytest.raises(ModelLoadError, match="missing file"):
            safetensors_io.load(tmp_path / name)
