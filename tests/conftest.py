import os
import sys
from pathlib import Path

# Parity tests compare float32 against float32: keep MLX's float32 matmuls and convolutions out of
# TF32 on GPUs that have it (MLX allows it by default; CPU and older GPUs are unaffected).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory) -> Path:
    """vocab.json + merges.txt of the real CLIP BPE."""
    return tiny_models.write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory, clip_vocab_dir) -> Path:
    """A tiny SD 1.x-shaped model folder: quick_gelu, conv projections, int heads, epsilon, PNDM config."""
    return tiny_models.build_sd(tmp_path_factory.mktemp("tiny_sd1"), clip_vocab_dir, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory, clip_vocab_dir) -> Path:
    """A tiny SD 2.x-shaped model folder: gelu, linear projections, per-block heads, upcast attention, v-prediction, '!' padding."""
    return tiny_models.build_sd(tmp_path_factory.mktemp("tiny_sd2"), clip_vocab_dir, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory, clip_vocab_dir) -> Path:
    """A tiny SDXL-shaped model folder: two encoders (the second projected), text_time, transformer depth 2."""
    return tiny_models.build_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), clip_vocab_dir)


@pytest.fixture(scope="session")
def tiny_sdxl_turbo(tmp_path_factory, clip_vocab_dir) -> Path:
    """The same with sdxl-turbo's scheduler (Euler ancestral, trailing), as the HF cache holds stabilityai/sdxl-turbo."""
    snapshot = tmp_path_factory.mktemp("hub") / "models--stabilityai--sdxl-turbo" / "snapshots" / ("0" * 40)
    return tiny_models.build_sdxl(snapshot, clip_vocab_dir, turbo=True)


@pytest.fixture(scope="session")
def tiny_sd1_inpaint(tmp_path_factory, clip_vocab_dir) -> Path:
    """tiny_sd1 as an inpainting model: a 9-input-channel UNet (latents, mask, masked-image latents)."""
    return tiny_models.build_sd(tmp_path_factory.mktemp("tiny_sd1_inpaint"), clip_vocab_dir, "sd1", inpaint=True)


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint(tmp_path_factory, clip_vocab_dir) -> Path:
    """tiny_sdxl as an inpainting model: a 9-input-channel UNet and StableDiffusionXLInpaintPipeline."""
    return tiny_models.build_sdxl(tmp_path_factory.mktemp("tiny_sdxl_inpaint"), clip_vocab_dir, inpaint=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` check the CUDA kernels against the portable path: they run only where MLX has a CUDA GPU."""
    import mlx.core as mx

    if mx.cuda.is_available():
        return
    gpu_only = [item for item in items if item.get_closest_marker("cuda")]
    if gpu_only:
        config.hook.pytest_deselected(items=gpu_only)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
