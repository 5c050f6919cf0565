"""Hostile model and LoRA files (issue 23): refused with one clear line, in bounded time, or read right.

Every malformed ``.safetensors`` file is crafted here from a valid one written by the ``safetensors``
library, and the library itself is the reference: a file it refuses is refused by every loader of the
package (model weights, LoRA files) with a ModelLoadError naming the file; a file it accepts loads to
the same tensors it reads.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as reference_load
from safetensors.torch import save_file

from stable_diffusion import ModelLoadError, model_io, safetensors_io
from stable_diffusion import lora as sdlora

ROOT = Path(__file__).resolve().parents[1]
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


def peft_file(path, config, tensors=None, module="a.to_q"):
    """A diffusers/PEFT LoRA: one rank-4 pair on ``unet.<module>`` and ``config`` as its adapter metadata
    (a string is written as is)."""
    tensors = tensors or {f"unet.{module}.lora_A.weight": torch.ones(4, 3), f"unet.{module}.lora_B.weight": torch.ones(5, 4)}
    raw = config if isinstance(config, str) else json.dumps(config)
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": raw})
    return path


def kohya_pair(**extra):
    return {"lora_unet_a.lora_down.weight": torch.ones(4, 3), "lora_unet_a.lora_up.weight": torch.ones(5, 4), **extra}


PEFT = {"unet.r": 4, "unet.lora_alpha": 8}
MALFORMED_LORAS = {
    "a scalar LoRA weight": ({"unet.a.lora_A.weight": torch.tensor(1.0), "unet.a.lora_B.weight": torch.ones(5, 4)}, PEFT, "do not form a rank-r LoRA pair"),
    "a rank-0 pair": ({"unet.a.lora_A.weight": torch.ones(0, 3), "unet.a.lora_B.weight": torch.ones(5, 0)}, {**PEFT, "unet.use_rslora": True}, "do not form a rank-r LoRA pair"),
    "a kohya alpha of two numbers": (kohya_pair(**{"lora_unet_a.alpha": torch.ones(2)}), None, r"lora_unet_a\.alpha holds 2 numbers"),
    "metadata []": (None, "[]", r"lora_adapter_metadata is '\[\]', not a JSON object"),
    "metadata null": (None, "null", "lora_adapter_metadata is 'null', not a JSON object"),
    "alpha null with rsLoRA": (None, {**PEFT, "unet.lora_alpha": None, "unet.use_rslora": True}, "unet.lora_alpha in its lora_adapter_metadata is 'None', not a number"),
    "alpha a dict with rsLoRA": (None, {**PEFT, "unet.lora_alpha": {"x": 1}, "unet.use_rslora": True}, "unet.lora_alpha .* not a number"),
    "alpha a string with rsLoRA": (None, {**PEFT, "unet.lora_alpha": "8", "unet.use_rslora": True}, "unet.lora_alpha in its lora_adapter_metadata is '8', not a number"),
    "alpha true": (None, {**PEFT, "unet.lora_alpha": True}, "unet.lora_alpha .* not a number"),
    "alpha_pattern an invalid regex": (None, {**PEFT, "unet.alpha_pattern": {"(": 2}}, r"alpha_pattern key '\(' is not a module path"),
    "alpha_pattern a list": (None, {**PEFT, "unet.alpha_pattern": ["a"]}, "unet.alpha_pattern in its lora_adapter_metadata is a list"),
    "alpha_pattern value a string": (None, {**PEFT, "unet.alpha_pattern": {"to_q": "2"}}, r"alpha_pattern\['to_q'\] .* not a number"),
    "use_rslora a string": (None, {**PEFT, "unet.use_rslora": "false"}, "unet.use_rslora .* is 'false', not true or false"),
    "a 50,000-deep JSON entry": (None, '{"unet.lora_alpha": 8, "unet.x": ' + "[" * 50_000 + "]" * 50_000 + "}", "lora_adapter_metadata is not JSON .*RecursionError"),
}


@pytest.mark.parametrize("case", MALFORMED_LORAS)
def test_malformed_lora_metadata_and_tensors_are_one_clear_line(tmp_path, case):
    tensors, config, message = MALFORMED_LORAS[case]
    path = tmp_path / "lora.safetensors"
    if config is None:
        save_file(tensors, str(path))
    else:
        peft_file(path, config, tensors)
    with pytest.raises(ModelLoadError, match=message) as error:
        sdlora.load(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


HOSTILE_PATTERN = """
import sys, time
from stable_diffusion import ModelLoadError, lora
start = time.perf_counter()
try:
    lora.load(sys.argv[1])
except ModelLoadError as e:
    print(e)
print(f"{time.perf_counter() - start:.3f}")
"""


def test_a_backtracking_alpha_pattern_is_refused_at_once(tmp_path):
    """Issue 23.3: "(a|a)+" against a module named "a" * 34 + "!" backtracks for hours in peft's regex."""
    import subprocess
    import sys

    path = peft_file(tmp_path / "hostile.safetensors", {**PEFT, "unet.alpha_pattern": {"(a|a)+": 2}, "unet.rank_pattern": {"(a|a)+": 2}}, module="a" * 34 + "!")
    # 60 s: an interpreter start and MLX import take seconds; the backtracking takes hours.
    run = subprocess.run([sys.executable, "-c", HOSTILE_PATTERN, str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    message, seconds = run.stdout.splitlines()
    assert message == f"{path}: unet.alpha_pattern key '(a|a)+' is not a module path (letters, digits, _ and dots); regular expressions from a file are not evaluated"
    assert float(seconds) < 5


def test_long_hostile_module_names_resolve_their_alpha_in_linear_time(tmp_path):
    names = ["a" * 34 + "!", "a." * 200_000 + "to_q", "x" * 400_000]
    tensors = {f"unet.{n}.lora_{ab}.weight": torch.ones(4, 3) if ab == "A" else torch.ones(5, 4) for n in names for ab in "AB"}
    patterns = {"a." * k + "to_q": k for k in range(1, 200)} | {"to_q": 1000, "a" * 34: 7}
    path = peft_file(tmp_path / "long.safetensors", {**PEFT, "unet.alpha_pattern": patterns}, tensors)
    pairs = sdlora.load(path).pairs  # listing every ending of the second name would copy 4e10 characters
    assert [pairs[("unet", n)].alpha for n in names] == [8, 1, 8]  # the first pattern in the file's order wins, as in peft


@pytest.mark.parametrize("order", ["random", "shortest first", "longest first"])
def test_alpha_patterns_resolve_as_peft_get_pattern_key(tmp_path, order):
    """Every ending of every module path of a diffusers UNet as a pattern, in three orders: the alpha
    of each module is the one peft's ``get_pattern_key`` picks (the first matching key; "proj" is an
    ending of ``ff.net.0.proj`` and not of ``time_emb_proj``)."""
    import random

    from diffusers import UNet2DConditionModel
    from peft.utils.other import get_pattern_key

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ends = sorted({".".join(n.split(".")[i:]) for n in names for i in range(n.count(".") + 1)})
    ends = {"random": random.Random(0).sample(ends, len(ends)), "shortest first": sorted(ends, key=len), "longest first": sorted(ends, key=len, reverse=True)}[order]
    patterns = {end: i + 10 for i, end in enumerate(ends)}
    tensors = {f"unet.{n}.lora_{ab}.weight": torch.ones(4, 3) if ab == "A" else torch.ones(5, 4) for n in names for ab in "AB"}
    pairs = sdlora.load(peft_file(tmp_path / "p.safetensors", {**PEFT, "unet.alpha_pattern": patterns}, tensors)).pairs

    expected = {n: patterns.get(get_pattern_key(patterns.keys(), n), PEFT["unet.lora_alpha"]) for n in names}
    assert {n: pairs[("unet", n)].alpha for n in names} == expected
    assert "proj" in patterns and any(n.endswith("_proj") for n in names)
