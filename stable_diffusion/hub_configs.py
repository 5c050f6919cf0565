"""The real Hub configs of the reference models, shipped with the package as verbatim JSON files.

``configs/<repo>/`` holds a Hugging Face repo's ``model_index.json``, each component's
``config.json`` (the scheduler's ``scheduler_config.json``) and its tokenizer JSON files, byte for
byte at the revision ``configs/SOURCES.json`` names, with each file's git blob id. A single-file
checkpoint has no configs of its own: it is read as the reference model of its family, as
diffusers' ``from_single_file`` does (``HubModel``). The tokenizer's vocabulary (1.6 MB) is not
shipped: it comes from the reference repo's HF cache, downloaded once when missing.
"""

import json
import os
from functools import cache
from pathlib import Path

from .errors import ModelLoadError
from .tokenizer import Tokenizer

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")

# The reference model of each family, as diffusers picks it for a single file (SD 2.x: the 768 px
# v-prediction 2.1), and sdxl-turbo's, whose known file is recognised by its hash.
FAMILY_FOLDERS = {"sd1": "stable-diffusion-v1-5", "sd2": "stable-diffusion-2-1", "sdxl": "stable-diffusion-xl-base-1.0"}
SDXL_TURBO_FOLDER = "sdxl-turbo"


@cache
def sources() -> dict:
    """``configs/SOURCES.json``'s repos: folder -> repo id, revision, and the git blob id of each file."""
    return json.loads((CONFIGS_DIR / "SOURCES.json").read_text())["repos"]


def config_name(component: str) -> str:
    return "scheduler_config.json" if component == "scheduler" else "config.json"


def read(folder: str, relative: str) -> dict:
    """One shipped JSON file, a fresh dict each call (callers may change it)."""
    return json.loads((CONFIGS_DIR / folder / relative).read_text())


class HubModel:
    """A reference Hub repo seen through its shipped configs and its tokenizers in the HF cache."""

    def __init__(self, folder: str):
        self.root = CONFIGS_DIR / folder
        self.folder = folder
        self.repo = sources()[folder]["repo"]
        self.name = str(self.root)

    def model_index(self) -> dict:
        return read(self.folder, "model_index.json")

    def config(self, component: str) -> dict:
        return read(self.folder, f"{component}/{config_name(component)}")

    def tokenizer(self, component: str) -> Tokenizer:
        return Tokenizer.from_folder(reference_tokenizer_dir(self.repo, component))


def offline() -> bool:
    """HF_HUB_OFFLINE as the HF libraries read it (the variable, or huggingface_hub's constant)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def reference_tokenizer_dir(repo: str, subfolder: str) -> Path:
    """The HF cache folder holding ``repo``'s tokenizer files, downloaded once when missing."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    fix = f"huggingface-cli download {repo} --include '{subfolder}/*'"
    paths = []
    for name in TOKENIZER_FILES:
        try:
            paths.append(hf_hub_download(repo, name, subfolder=subfolder, local_files_only=True))
            continue
        except LocalEntryNotFoundError:
            pass
        if offline():
            raise ModelLoadError(
                f"single-file checkpoints take their tokenizer from {repo}, which is not in the Hugging Face "
                f"cache and cannot be downloaded offline; fetch it once with: {fix}"
            )
        try:
            paths.append(hf_hub_download(repo, name, subfolder=subfolder))
        except (HfHubHTTPError, OSError) as e:
            raise ModelLoadError(
                f"the tokenizer files of {repo} could not be downloaded ({type(e).__name__}); "
                f"check the network or fetch them with: {fix}"
            ) from None
    return Path(paths[0]).parent
