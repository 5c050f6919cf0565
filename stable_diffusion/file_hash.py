"""A1111's "Model hash" of a checkpoint file: the first 10 hex digits of its sha256.

Hashing a 7 GB file takes seconds, so each digest is cached by path, size and mtime in the user's
cache folder (never next to the model).
"""

import hashlib
import json
import os
from pathlib import Path


def _hash_cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "stable_diffusion_mlx" / "sha256.json"


def file_sha256(path) -> str:
    """The sha256 of a file, cached by path, size and mtime (in the user cache, never next to the file)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a rehash next time
    return cache[key]


def model_hash(path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]
