"""Full-size architecture tests: each preset, built from its real Hub configs with random weights
and laid out like its Hub repo (tests/real_models.py), loads through our loader and matches
diffusers' pipeline on the same folder; its tokenizers match transformers' on the real files.

The models are big (SDXL's UNet is 10.3 GB in float32) and MLX's CPU matmul is slow, so: the
weights of each architecture are written once per session, by a background process, while
earlier presets run; diffusers and this package each run in their own process, side by side for
SD 1/2 (MLX's CPU backend uses one core) and one after the other for SDXL (24 GB of RAM); the run
is an 8x8 latent, 2 steps. Select these tests with ``-m fullsize``, skip them with ``-m "not fullsize"``.
"""

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import real_models
import torch
from parity import relative_error

from stable_diffusion.sampler_names import SAMPLERS

pytestmark = pytest.mark.fullsize

BUILDER = str(Path(real_models.__file__))
TIMEOUT = 1200  # seconds for one process
# The VAE of sd-2.1 and sd-turbo is sd-2.1-base's (same files, same config), sdxl-turbo's is
# sdxl-base's: their images follow from their latents, so only these presets decode (33 s each).
DECODED = ("sd-1.5", "sd-2.1-base", "sdxl-base")


def _run(args: list, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, BUILDER, *map(str, args)], stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, log: Path):
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert code == 0, f"{' '.join(process.args[1:])} failed:\n{log.read_text()[-3000:]}"


class _Weights:
    """Builds each architecture's weight files once: the first one asked for, then the later ones in the background."""

    def __init__(self, root: Path):
        self.root = root
        self.done = {arch: threading.Event() for arch in real_models.WEIGHT_FILES}
        self.errors = {}
        self.thread, self.order = None, []

    def _build(self, arch):
        log = self.root / f"weights-{arch}.log"
        try:
            _wait(_run(["weights", arch, self.root / arch], log), log)
        except BaseException as e:  # reported by get()
            self.errors[arch] = e
        self.done[arch].set()

    def _build_all(self, order):
        for arch in order:
            self._build(arch)

    def get(self, arch: str) -> Path:
        if self.thread is None:  # presets run in PRESETS order: build this one and the ones after it
            order = list(dict.fromkeys(real_models.ARCH[p] for p in real_models.PRESETS))
            self.order = order[order.index(arch) :]
            self.thread = threading.Thread(target=self._build_all, args=(self.order,), daemon=True)
            self.thread.start()
        elif arch not in self.order and not self.done[arch].is_set():
            self._build(arch)
        self.done[arch].wait()
        if arch in self.errors:
            raise self.errors[arch]
        return self.root / arch


@pytest.fixture(scope="session")
def real_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_weights")
    weights = _Weights(root)
    yield weights
    if weights.thread is not None:
        weights.thread.join()
    shutil.rmtree(root, ignore_errors=True)  # 34 GB, and pytest keeps the last three sessions' folders


@pytest.fixture(scope="session")
def real_folder(real_weights, clip_vocab_dir):
    def folder(preset: str) -> Path:
        path = real_weights.root / "presets" / preset
        if not path.is_dir():
            real_models.write_folder(preset, path, clip_vocab_dir, real_weights.get(real_models.ARCH[preset]))
        return path

    return folder


@pytest.mark.parametrize("preset", real_models.PRESETS)
def test_tokenizers_pad_like_transformers_on_the_real_tokenizer_files(preset, tmp_path, clip_vocab_dir):
    from transformers import CLIPTokenizer

    from stable_diffusion.tokenizer import Tokenizer

    folder = real_models.write_folder(preset, tmp_path / preset, clip_vocab_dir)  # configs and tokenizers only
    for name in ("tokenizer", "tokenizer_2"):
        if not (folder / name).is_dir():
            continue
        reference = CLIPTokenizer.from_pretrained(folder / name)
        expected = reference(real_models.PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
        ours = Tokenizer.from_folder(folder / name)
        ids, _ = ours.pad_and_truncate(ours.tokenize(real_models.PROMPT))
        assert ids == expected, f"{preset} {name}"
        # SD 2.x and SDXL's second tokenizer pad with "!" (id 0), the others with <|endoftext|>.
        pad = real_models.CONFIGS[preset][f"{name}/special_tokens_map.json"]["pad_token"]
        assert ids[-1] == (0 if pad == "!" else 49407)


@pytest.mark.parametrize("preset", real_models.PRESETS)
def test_full_size_preset_matches_diffusers(preset, real_folder, tmp_path):
    folder = real_folder(preset)
    init = torch.randn((1, 4, real_models.LATENT, real_models.LATENT), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "init.npy", init.numpy())
    ours_args = ["ours", preset, folder, tmp_path / "init.npy", tmp_path / "ours.npz"]
    ours_args += [] if preset in DECODED else ["--no-decode"]
    reference_args = ["reference", preset, folder, tmp_path / "init.npy", tmp_path / "reference.npz"]
    logs = tmp_path / "ours.log", tmp_path / "reference.log"
    if real_models.ARCH[preset] == "sdxl":  # 14 GB each in float32: one at a time
        _wait(_run(reference_args, logs[1]), logs[1])
        _wait(_run(ours_args, logs[0]), logs[0])
    else:
        processes = _run(ours_args, logs[0]), _run(reference_args, logs[1])
        for process, log in zip(processes, logs):
            _wait(process, log)

    ours, reference = np.load(tmp_path / "ours.npz"), np.load(tmp_path / "reference.npz")
    # issue 19: with no sampler named, both run the folder's own scheduler class (PNDM for SD 1.5 and
    # SD 2.1-base, Euler for SDXL, Euler ancestral for the turbos).
    assert SAMPLERS[str(ours["sampler"])].diffusers_class == str(reference["scheduler"])
    # Exactly the files diffusers loads: the non-variant weights, never the fp16 or non_ema variant too.
    assert sorted(ours["loaded"]) == real_models.expected_weight_files(preset, float16=False)
    ref_latents = reference["latents"].transpose(0, 2, 3, 1)
    assert np.isfinite(ref_latents).all() and ref_latents.std() > 0.1
    errors = {"latents": relative_error(ours["latents"], ref_latents)}
    if preset in DECODED:
        assert 0.05 < reference["images"].mean() < 0.95  # not saturated: clipping would hide errors
        errors["images"] = relative_error(ours["images"], reference["images"])
    print(f"{preset}: relative error {errors}, ours {ours['seconds'].round(1).tolist()} s (generate, decode)")
    assert max(errors.values()) <= 1e-4, errors
