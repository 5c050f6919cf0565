"""A1111's "Model hash" of a checkpoint file: the first 10 hex digits of its sha256.

Hashing a 7 GB file takes seconds, so each digest is cached by path, size and mtime in the user's
cache folder (never next to the model).
"""

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _hash_cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "stable_diffusion_mlx" / "sha256.json"


def file_sha256(path) -> str:
    """The sha256 of a file, cached by path, size and mtime (in the user cache, never next to the file)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = _hash_cache_file()
    cache = _read_cache(cache_file)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    _write_cache(cache_file, cache)
    return cache[key]


def _read_cache(cache_file: Path) -> dict:
    """The cache's well-formed entries. A missing, unreadable or malformed file (a list, null, binary
    junk, another program's JSON) counts as empty: it is a cache, and the next write replaces it."""
    if not cache_file.is_file():  # missing, or a FIFO that would block the read
        return {}
    try:
        cache = json.loads(cache_file.read_bytes())
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8, not JSON
        return {}
    if not isinstance(cache, dict):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, str) and _SHA256.fullmatch(v)}


def _write_cache(cache_file: Path, cache: dict):
    """Replace the cache file whole (a reader never sees half of it); a read-only cache only costs a rehash next time."""
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, cache_file)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def model_hash(path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]
