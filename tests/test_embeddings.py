"""Textual-inversion files (stable_diffusion.embeddings) against diffusers' load_textual_inversion,
the safetensors library and A1111's documented reading of each layout and of its ``TI hashes``."""

import hashlib
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

import ti_files
from stable_diffusion import ModelLoadError
from stable_diffusion.embeddings import MAX_VECTORS, Embedding, check_fits, infotext_hashes, load_embedding


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    """file_hash caches digests in the user's cache folder: keep the tests' files out of it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def reference_vectors(path) -> dict:
    """Each tensor of the file as float32, read by the safetensors library and cast by torch (as A1111 does)."""
    return {key: value.float().numpy() for key, value in load_file(str(path)).items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key", ["emb_params", "string_to_param.*"])
def test_a1111_sd_file_reads_as_float32_vectors_named_after_the_file(tmp_path, dtype, key):
    path = ti_files.write_a1111_sd(tmp_path / "EasyNegative.safetensors", ti_files.random_vectors(8, 768), dtype, key=key)
    embedding = load_embedding(path)
    assert embedding.name == "EasyNegative"  # A1111: the file name without its extension
    assert embedding.path == str(path)
    assert len(embedding.vectors) == 1
    assert embedding.vectors[0].dtype == np.float32
    np.testing.assert_array_equal(embedding.vectors[0], reference_vectors(path)[key])


def test_sdxl_file_gives_clip_l_then_clip_g(tmp_path):
    clip_l, clip_g = ti_files.random_vectors(2, 768, seed=1), ti_files.random_vectors(2, 1280, seed=2)
    path = ti_files.write_a1111_sdxl(tmp_path / "negativeXL_D.safetensors", clip_l, clip_g, torch.float16)
    embedding = load_embedding(path)
    reference = reference_vectors(path)
    assert embedding.name == "negativeXL_D" and len(embedding.vectors) == 2
    np.testing.assert_array_equal(embedding.vectors[0], reference["clip_l"])
    np.testing.assert_array_equal(embedding.vectors[1], reference["clip_g"])
    check_fits(embedding, (768, 1280))


def test_token_names_the_embedding_instead_of_the_file(tmp_path):
    path = ti_files.write_diffusers(tmp_path / "learned_embeds.safetensors", "<cat-toy>", ti_files.random_vectors(1, 768))
    assert load_embedding(path).name == "learned_embeds"  # as A1111: the key is not the prompt word
    assert load_embedding(path, token="<cat-toy>").name == "<cat-toy>"
    with pytest.raises(ValueError, match="token=' ': the word that calls an embedding in a prompt cannot be empty"):
        load_embedding(path, token=" ")


def reference_pipe(folder, xl: bool):
    import diffusers

    if xl:
        return diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def diffusers_vectors(pipe, path, token, encoder="text_encoder", tokenizer="tokenizer", state=None):
    """The rows diffusers' load_textual_inversion writes into the encoder's token embedding for ``token``
    (a multi-vector embedding is ``token``, ``token_1``, ...)."""
    tokenizer, encoder = getattr(pipe, tokenizer), getattr(pipe, encoder)
    before = len(tokenizer)
    pipe.load_textual_inversion(str(path) if state is None else state, token=token, tokenizer=tokenizer, text_encoder=encoder)
    return encoder.get_input_embeddings().weight[before : len(tokenizer)].detach().numpy()


LAYOUTS = {  # name: (writer(path, vectors), vectors' shape)
    "diffusers, 3 vectors": (lambda p, v: ti_files.write_diffusers(p, "<tiny-cat>", v), (3, 32)),
    "diffusers, a (dims,) vector": (lambda p, v: ti_files.write_diffusers(p, "<tiny-cat>", v[0]), (1, 32)),
    "kohya emb_params, fp16": (lambda p, v: ti_files.write_a1111_sd(p, v, torch.float16), (4, 32)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sd1_vectors_match_diffusers_load_textual_inversion(tiny_sd1, tmp_path, layout):
    write, shape = LAYOUTS[layout]
    path = write(tmp_path / "tiny-cat.safetensors", ti_files.random_vectors(*shape))
    pipe = reference_pipe(tiny_sd1, xl=False)
    expected = diffusers_vectors(pipe, path, "<tiny-cat>")
    embedding = load_embedding(path, token="<tiny-cat>")
    assert len(embedding.vectors) == 1 and embedding.vectors[0].shape == shape
    np.testing.assert_array_equal(embedding.vectors[0], expected)
    check_fits(embedding, (pipe.text_encoder.config.hidden_size,))


def test_sdxl_vectors_match_diffusers_documented_sdxl_loading(tiny_sdxl, tmp_path):
    """diffusers' docs load an SDXL embedding with load_file, then clip_l into text_encoder and clip_g into text_encoder_2."""
    path = ti_files.write_a1111_sdxl(tmp_path / "tiny.safetensors", ti_files.random_vectors(2, 32, 1), ti_files.random_vectors(2, 40, 2))
    pipe = reference_pipe(tiny_sdxl, xl=True)
    state = load_file(str(path))
    tokens = ["<s0>", "<s1>"]
    expected = (
        diffusers_vectors(pipe, None, tokens, "text_encoder", "tokenizer", state["clip_l"]),
        diffusers_vectors(pipe, None, tokens, "text_encoder_2", "tokenizer_2", state["clip_g"]),
    )
    embedding = load_embedding(path)
    assert len(embedding.vectors) == 2
    for ours, theirs in zip(embedding.vectors, expected):
        np.testing.assert_array_equal(ours, theirs)
    check_fits(embedding, (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size))


def test_ti_hash_is_the_first_12_hex_digits_of_the_whole_files_sha256(tmp_path):
    """A1111: Embedding.set_hash(hashes.sha256(file)) keeps hash[0:12]; the whole file is hashed (not
    kohya's addnet hash of the tensors only), so the same vectors with other metadata hash differently."""
    vectors = ti_files.random_vectors(3, 768)
    a = ti_files.write_a1111_sd(tmp_path / "a.safetensors", vectors)
    b = ti_files.write_diffusers(tmp_path / "b.safetensors", "emb_params", vectors)
    hashes = [load_embedding(p).hash for p in (a, b)]
    assert hashes == [hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (a, b)]
    assert hashes[0] != hashes[1]


def test_infotext_hashes_as_a1111_writes_them():
    """sd_hijack_clip.py: ``name: shorthash`` joined by ", ", ":" and "," removed from each name."""
    vectors = (np.zeros((1, 768), np.float32),)
    embeddings = [Embedding("bad:hands,v2", vectors, "0123456789ab", "x"), Embedding("EasyNegative", vectors, "c74b4e810b03", "y")]
    assert infotext_hashes(embeddings) == "badhandsv2: 0123456789ab, EasyNegative: c74b4e810b03"


@pytest.mark.parametrize(
    "dims, family, model_dims, model_family",
    [((768,), "SD 1.x", (768, 1280), "SDXL"), ((768, 1280), "SDXL", (768,), "SD 1.x"), ((768,), "SD 1.x", (1024,), "SD 2.x")],
)
def test_an_embedding_for_other_text_encoders_is_refused_naming_both(tmp_path, dims, family, model_dims, model_family):
    embedding = Embedding("e", tuple(np.zeros((2, d), np.float32) for d in dims), "0" * 12, str(tmp_path / "e.safetensors"))
    with pytest.raises(ValueError) as e:
        check_fits(embedding, model_dims)
    assert str(e.value) == (
        f"{tmp_path / 'e.safetensors'}: an embedding for text encoders of width {' and '.join(map(str, dims))} ({family}); "
        f"this model's text encoders are {' and '.join(map(str, model_dims))} ({model_family})"
    )


class Payload:
    """A pickle that creates a file when unpickled: proof that a refused file was never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def numpy_file(tensors):
    return lambda p: save_numpy(tensors, str(p))


V = ti_files.random_vectors(2, 8)
HOSTILE = {  # name: (file name, writer(path), the error after "<path>: ")
    "an A1111 .pt pickle": ("neg.pt", lambda p: p.write_bytes(pickle.dumps({"string_to_param": Payload(p.with_name("ran"))})), "a pickled embedding file; this library reads safetensors only and never unpickles"),
    "a .bin pickle": ("learned_embeds.bin", lambda p: p.write_bytes(pickle.dumps(Payload(p.with_name("ran")))), "a pickled embedding file"),
    "a pickle named .safetensors": ("neg.safetensors", lambda p: p.write_bytes(pickle.dumps(Payload(p.with_name("ran")))), "not a valid safetensors file"),
    "an empty file": ("neg.safetensors", lambda p: p.write_bytes(b""), "not a valid safetensors file"),
    "no tensors": ("neg.safetensors", numpy_file({}), r"not a textual-inversion embedding \(keys: none\)"),
    "two unrelated tensors": ("neg.safetensors", numpy_file({"emb_params": V, "string_to_token": np.zeros(1, np.int64)}), r"not a textual-inversion embedding \(keys: emb_params, string_to_token\); expected one tensor"),
    "a NaN": ("neg.safetensors", numpy_file({"emb_params": np.where(np.arange(16).reshape(2, 8) == 5, np.nan, V).astype(np.float32)}), "emb_params holds inf or NaN"),
    "an inf in fp16": ("neg.safetensors", numpy_file({"emb_params": np.full((2, 8), np.inf, np.float16)}), "emb_params holds inf or NaN"),
    "integers": ("neg.safetensors", numpy_file({"emb_params": np.ones((2, 8), np.int32)}), "emb_params is int32; embedding vectors are fp32, fp16 or bf16"),
    "float64": ("neg.safetensors", numpy_file({"emb_params": V.astype(np.float64)}), r"tensor emb_params \(F64\) has a dtype MLX cannot load"),
    "3 dimensions": ("neg.safetensors", numpy_file({"emb_params": V[None]}), r"emb_params has shape \(1, 2, 8\); expected \(n, dims\) with 1 to 75 vectors"),
    "a scalar": ("neg.safetensors", numpy_file({"emb_params": np.array(1.0, np.float32)}), r"emb_params has shape \(\); expected"),
    "no vectors": ("neg.safetensors", numpy_file({"emb_params": np.zeros((0, 8), np.float32)}), r"emb_params has shape \(0, 8\); expected"),
    "vectors of width 0": ("neg.safetensors", numpy_file({"emb_params": np.zeros((2, 0), np.float32)}), r"emb_params has shape \(2, 0\); expected"),
    "more vectors than a chunk holds": ("neg.safetensors", numpy_file({"emb_params": np.zeros((MAX_VECTORS + 1, 8), np.float32)}), r"emb_params has shape \(76, 8\); expected \(n, dims\) with 1 to 75 vectors \(a prompt chunk"),
    "SDXL vectors counts that differ": ("neg.safetensors", numpy_file({"clip_l": V, "clip_g": V[:1]}), "clip_l has 2 vectors and clip_g 1; an SDXL embedding has as many for each text encoder"),
    "SDXL with another key": ("neg.safetensors", numpy_file({"clip_l": V, "clip_g": V, "emb_params": V}), "an SDXL embedding holds clip_l and clip_g only, not also emb_params"),
    "a missing file": ("absent.safetensors", lambda p: None, r"missing file \(or not a regular file\)"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_bad_files_are_refused_in_one_line_naming_the_file(tmp_path, case):
    name, write, message = HOSTILE[case]
    path = tmp_path / name
    write(path)
    with pytest.raises(ModelLoadError) as e:
        load_embedding(path)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert re.match(message, text[len(f"{path}: ") :]), text
    assert not (tmp_path / "ran").exists()  # no pickle was ever unpickled
