"""Hostile model and LoRA files (issue 23): refused with one clear line, in bounded time, or read right.

Every malformed ``.safetensors`` file is crafted here from a valid one written by the ``safetensors``
library, and the library itself is the reference: a file it refuses is refused by every loader of the
package (model weights, LoRA files) with a ModelLoadError naming the file; a file it accepts loads to
the same tensors it reads.
"""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
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


class TwoLayers(mlx_nn.Module):
    """A small model for LoRAs to target: text_encoder.fc and .fc2, (5, 3) Linears (kohya: lora_te_fc, lora_te_fc2)."""

    def __init__(self, dtype=mx.float32):
        super().__init__()
        self.fc = mlx_nn.Linear(3, 5)
        self.fc2 = mlx_nn.Linear(3, 5)
        self.set_dtype(dtype)


def kohya_fc(path, down, up, alpha=None, module="fc", others=()):
    """A kohya LoRA on text_encoder.<module>, and the same plain 0.1 pair on each of ``others``."""
    tensors = {}
    for name, (d, u) in {module: (down, up), **{other: (DOWN, UP) for other in others}}.items():
        tensors |= {f"lora_te_{name}.lora_down.weight": d, f"lora_te_{name}.lora_up.weight": u}
    if alpha is not None:
        tensors[f"lora_te_{module}.alpha"] = alpha
    save_file(tensors, str(path))
    return path


def with_value(tensor, value):
    tensor = tensor.clone()
    tensor.view(-1)[1] = value
    return tensor


DOWN, UP = torch.full((4, 3), 0.1), torch.full((5, 4), 0.1)
BAD_NUMBERS_AT_LOAD = {
    "int32 weights": (lambda p: kohya_fc(p, DOWN.int(), UP.int()), r"lora_te_fc\.lora_down\.weight \(int32\), lora_te_fc\.lora_up\.weight \(int32\)\) are not floats"),
    "a NaN in an up weight": (lambda p: kohya_fc(p, DOWN, with_value(UP, float("nan"))), r"1 weights \(lora_te_fc\.lora_up\.weight\) hold inf or NaN"),
    "an inf in an fp16 down weight": (lambda p: kohya_fc(p, with_value(DOWN.half(), float("inf")), UP.half()), r"lora_te_fc\.lora_down\.weight\) hold inf or NaN"),
    "a NaN kohya alpha": (lambda p: kohya_fc(p, DOWN, UP, torch.tensor(float("nan"))), r"lora_te_fc\.alpha is nan; an alpha is a finite number"),
    "an inf kohya alpha": (lambda p: kohya_fc(p, DOWN, UP, torch.tensor(float("-inf"))), r"lora_te_fc\.alpha is -inf"),
    "a complex kohya alpha": (lambda p: kohya_fc(p, DOWN, UP, torch.tensor(1 + 2j, dtype=torch.complex64)), r"lora_te_fc\.alpha is a complex64; an alpha is a real number"),
    "a PEFT lora_alpha of Infinity": (lambda p: peft_file(p, {**PEFT, "unet.lora_alpha": float("inf")}), "unet.lora_alpha in its lora_adapter_metadata is inf, not a finite number"),
    "a PEFT lora_alpha beyond every float": (lambda p: peft_file(p, {**PEFT, "unet.lora_alpha": 10**400}), r"unet.lora_alpha in its lora_adapter_metadata is 1000+, not a finite number"),
    "a PEFT alpha_pattern of NaN": (lambda p: peft_file(p, {**PEFT, "unet.alpha_pattern": {"to_q": float("nan")}}), r"alpha_pattern\['to_q'\] in its lora_adapter_metadata is nan"),
}


@pytest.mark.parametrize("case", BAD_NUMBERS_AT_LOAD)
def test_non_float_or_non_finite_lora_numbers_are_refused_naming_the_key(tmp_path, case):
    write, message = BAD_NUMBERS_AT_LOAD[case]
    path = write(tmp_path / "lora.safetensors")
    with pytest.raises(ModelLoadError, match=message) as error:
        sdlora.load(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


# (down, up, alpha, scale, model dtype): every update element is scale * alpha / 4 * (4 * down * up),
# beyond float32's 3.4e38 or float16's 65504; each number alone is finite.
OVERFLOWS = {
    "huge weights": (DOWN * 1e30, UP * 1e30, None, 1.0, mx.float32),  # 4e58
    "a huge kohya alpha": (DOWN * 100, UP * 100, torch.tensor(3e38), 1.0, mx.float32),  # 3e38 / 4 * 400 = 3e40
    "a huge scale": (DOWN * 100, UP * 100, None, 1e38, mx.float32),  # 1e38 * 400 = 4e40
    "an update beyond float16": (DOWN * 2000, UP * 2000, None, 1.0, mx.float16),  # 4 * 200 * 200 = 160000
}


@pytest.mark.parametrize("case", OVERFLOWS)
def test_a_merge_that_overflows_the_weights_dtype_is_refused_and_nothing_changes(tmp_path, case):
    down, up, alpha, scale, dtype = OVERFLOWS[case]
    path = kohya_fc(tmp_path / "lora.safetensors", down, up, alpha, module="fc2", others=["fc"])  # fc merges first, and fine
    model = TwoLayers(dtype)
    before = dict(tree_flatten(model.parameters()))
    expected = f"{path}: at scale {scale:g} the update overflows 1 weights (text_encoder.fc2 ({str(dtype)[9:]})) to inf or NaN; nothing was applied"
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        sdlora.apply({"text_encoder": model}, sdlora.load(path), scale)
    assert all(value is before[key] for key, value in tree_flatten(model.parameters()))


def test_the_float16_overflow_is_the_targets_alone(tmp_path):
    """The same LoRA merges into float32 weights, as in torch: W + scale * alpha / r * up @ down."""
    down, up, *_ = OVERFLOWS["an update beyond float16"]
    model = TwoLayers(mx.float32)
    expected = torch.tensor(np.array(model.fc.weight)) + (up @ down)
    sdlora.apply({"text_encoder": model}, sdlora.load(kohya_fc(tmp_path / "lora.safetensors", down, up)), 1.0)
    # float32 on both sides: 4 products, their sum and the add round within 3 ulps (3 * 2^-23 < 1e-6)
    assert np.allclose(np.array(model.fc.weight), expected.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_scale_is_a_value_error(tmp_path, scale):
    path = kohya_fc(tmp_path / "lora.safetensors", DOWN, UP)
    model = TwoLayers()
    with pytest.raises(ValueError, match=re.escape(f"{path}: the LoRA scale {scale!r} is not a finite number")):
        sdlora.apply({"text_encoder": model}, sdlora.load(path), scale)
