"""The checkpoints and LoRAs the server offers, by the names A1111's API gives them.

A checkpoint is the server's ``--model``, a preset, a diffusers repo in the Hugging Face cache, or
a ``.safetensors`` file or diffusers folder directly in ``--models-dir``. A request names one by
its ``title`` or ``model_name`` (``sd_model_checkpoint``); the name is looked up in this list and
never used as a path, so no request reaches a file outside these places.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..pipeline import PRESETS


@dataclass(frozen=True)
class Checkpoint:
    title: str  # what sd_model_checkpoint is set to and /options reports
    model_name: str
    source: str  # what load_model takes: a preset's repo id, a repo id, a folder or a file
    filename: str


def _hf_cache_repos() -> list[str]:
    """Repo ids of the diffusers pipelines in the Hugging Face cache (a snapshot with a model_index.json)."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE)
    repos = []
    if not root.is_dir():
        return repos
    for folder in sorted(root.glob("models--*")):
        if any(folder.glob("snapshots/*/model_index.json")):
            repos.append(folder.name[len("models--") :].replace("--", "/", 1))
    return repos


def _local(folder: Optional[str]) -> list[Path]:
    """The checkpoints directly in ``folder``: .safetensors files and diffusers folders, sorted by name."""
    if folder is None or not os.path.isdir(folder):
        return []
    found = []
    for entry in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() == ".safetensors" or entry.is_dir() and (entry / "model_index.json").is_file():
            found.append(entry)
    return found


def checkpoints(first: str, models_dir: Optional[str]) -> list[Checkpoint]:
    """The list /sd-models answers: the server's own model first, then --models-dir, presets, the HF cache."""
    listed: dict[str, Checkpoint] = {}

    def add(title: str, source: str, filename: str):
        if title not in listed:
            listed[title] = Checkpoint(title, title, source, filename)

    own = Path(first).expanduser()
    add(own.name if own.exists() else first, str(own) if own.exists() else PRESETS.get(first, first), str(own) if own.exists() else first)
    for path in _local(models_dir):
        add(path.name, str(path), str(path))
    for name, repo in PRESETS.items():
        add(name, repo, repo)
    for repo in _hf_cache_repos():
        if repo not in PRESETS.values():
            add(repo, repo, repo)
    return list(listed.values())


def find(listing: list[Checkpoint], name: str) -> Optional[Checkpoint]:
    """The checkpoint a client names: its title or model_name, with or without ``.safetensors`` and A1111's `` [hash]``."""
    wanted = name.strip()
    if wanted.endswith("]") and " [" in wanted:
        wanted = wanted[: wanted.rindex(" [")]
    for checkpoint in listing:
        names = {checkpoint.title, checkpoint.model_name, Path(checkpoint.title).stem}
        if wanted in names or wanted.removesuffix(".safetensors") in names:
            return checkpoint
    return None


def loras(lora_dir: Optional[str]) -> list[dict]:
    """/loras as A1111's Lora extension answers it: name, alias, path and metadata of each file in --lora-dir."""
    if lora_dir is None or not os.path.isdir(lora_dir):
        return []
    files = sorted(p for p in Path(lora_dir).iterdir() if p.is_file() and p.suffix.lower() == ".safetensors" and not p.name.startswith("."))
    return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]
