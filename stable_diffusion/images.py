"""Picture files: read any picture as RGB, resize to a multiple, grids, A1111 metadata, atomic writes.

Pure picture code: bad input raises ValueError with a message for the user (``cli`` turns it into
the scripts' one-line error).

The PNG metadata is the ``parameters`` text chunk written by AUTOMATIC1111's web UI
(``modules/infotext_utils.py``), which A1111's PNG Info, ComfyUI importers and Civitai read::

    a photo of an astronaut
    Negative prompt: blurry
    Steps: 50, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd-2.1-base
"""

import errno
import hashlib
import json
import os
import re
import socket
import stat
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

class WriteError(ValueError):
    """A picture could not be written (disk full, a directory in the way, a name too long); nothing was left behind."""


# Extension -> PIL format. Only PNG carries the parameters chunk.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def sibling(path: Path, *suffixes) -> Path:
    """``out.png`` -> ``out_<s1>_<s2>.png``: interim and individual images sit beside the output."""
    return path.with_name("_".join([path.stem, *map(str, suffixes)]) + path.suffix)


# ---------------------------------------------------------------------------------------------
# Reading


def load_image(path: str) -> Image.Image:
    """Open any image file as an 8-bit RGB picture, EXIF orientation applied.

    Transparency (RGBA, LA, P with a transparent colour) is composited over white; 16-bit and
    32-bit greyscale are scaled to 8 bits; CMYK and the other modes go through PIL's conversion.
    """
    return to_rgb(open_picture(path, "input image"))


def open_picture(path, what: str) -> Image.Image:
    """An image file read whole, EXIF orientation applied, in its own mode; ValueError naming ``what`` and the path otherwise."""
    with open_regular(path, what) as f:
        try:
            with warnings.catch_warnings():
                # Past PIL's limit (89 Mpx) a warning, past twice that an error; the scripts check the
                # memory a large picture needs themselves, so only the error stops here.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as image:
                    image.load()
                    return _oriented(image)
        except Image.DecompressionBombError as e:
            raise ValueError(f"{what} {str(path)!r} is too large to open safely ({e})") from None
        except UnidentifiedImageError:
            raise ValueError(f"{what} {str(path)!r} is not an image PIL can read") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ValueError(f"{what} {str(path)!r} is corrupt or truncated ({e})") from None


def open_regular(path, what: str):
    """``path`` opened for binary reading, or ValueError naming ``what`` and the path when it is not a regular file.

    A FIFO would block the open (or the read) forever, and a device such as /dev/zero never ends: the
    open does not block, and the kind of file is checked on the open descriptor, so nothing can swap
    it between a check and the open.
    """
    try:
        fd = os.open(Path(path).expanduser(), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {str(path)!r} is a directory") from None
    except PermissionError:
        raise ValueError(f"{what} {str(path)!r} cannot be read (permission denied)") from None
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be read ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise ValueError(f"{what} {str(path)!r} is {kind}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _oriented(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block only loses the rotation, not the picture
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(image, dtype=np.float64)
        # Integer greyscale is 16-bit data (PNG); float data is taken as [0, 1] when it fits there.
        scale = 1 / 257 if image.mode != "F" else (255 if a.max(initial=0) <= 1 else 1)
        grey = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def size_to_multiple(size: tuple, multiple: int, allow_resize: bool = True) -> tuple:
    """(width, height) shrunk down to multiples of ``multiple``, as diffusers' VaeImageProcessor; ValueError when impossible."""
    w, h = size
    if w < multiple or h < multiple:
        raise ValueError(f"the input image is {w}x{h}; each side must be at least {multiple} px")
    new = (w // multiple * multiple, h // multiple * multiple)
    if new != (w, h) and not allow_resize:
        raise ValueError(f"the input image is {w}x{h}, not a multiple of {multiple} px on each side (--no-resize is set)")
    return new


def resize_to_multiple(image: Image.Image, multiple: int, allow_resize: bool = True) -> Image.Image:
    """Shrink each side down to a multiple of ``multiple`` (Lanczos), or refuse when resizing is off."""
    new = size_to_multiple(image.size, multiple, allow_resize)
    return image if new == image.size else image.resize(new, Image.Resampling.LANCZOS)


def to_model_input(image: Image.Image) -> np.ndarray:
    """RGB picture -> (H, W, 3) float32 in [-1, 1], what the facade's img2img takes."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# Building pictures


def to_uint8(images) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] (mx or numpy) -> uint8, NaN as black."""
    a = np.nan_to_num(np.asarray(images, dtype=np.float32), nan=0.0)
    return np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, n_rows: int) -> np.ndarray:
    """(N, H, W, C) -> one (n_rows H, N/n_rows W, C) picture, images in reading order."""
    n, h, w, c = images.shape
    if n % n_rows:
        raise ValueError(f"{n} images do not fill {n_rows} rows")
    n_cols = n // n_rows
    x = images.reshape(n_rows, n_cols, h, w, c)
    return x.transpose(0, 2, 1, 3, 4).reshape(n_rows * h, n_cols * w, c)  # (rows*H, cols*W, C)


# ---------------------------------------------------------------------------------------------
# Metadata


def _quote(value) -> str:
    """A1111's quoting: values holding a comma, colon or newline are written as JSON strings."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_parameters(prompt: str, negative_prompt: str = "", **fields) -> str:
    """The A1111 ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value`` pairs.

    Field names are given with underscores (``CFG_scale=7.5``) and written with spaces; None is skipped.
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = [f"{k.replace('_', ' ')}: {_quote(v)}" for k, v in fields.items() if v is not None]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param


def parse_parameters(text: str) -> dict:
    """Read A1111 ``parameters`` text back: {"Prompt", "Negative prompt", and every Key: value}."""
    *head, last = text.strip("\n").split("\n")
    if len(_PAIR.findall(last)) < 3:  # no parameter line at all: everything is prompt
        head, last = [*head, last], ""
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        result[key.strip()] = value
    return result


# JPEG and WebP carry the text as A1111 writes it there: the EXIF UserComment, in UTF-16 behind
# the 8-byte character code "UNICODE\0" (piexif.helper.UserComment.dump(..., encoding="unicode")).
EXIF_IFD, USER_COMMENT, UNICODE_CODE = 0x8769, 0x9286, b"UNICODE\0"


def read_parameters(path) -> str | None:
    """The A1111 ``parameters`` text of a picture file (PNG text chunk, JPEG/WebP EXIF UserComment), or None."""
    with Image.open(path) as image:
        return parameters_of(image)


def read_back(path) -> tuple[str | None, tuple[int, int]]:
    """(parameters text or None, (width, height)) of a picture that decodes whole; ValueError otherwise."""
    try:
        with open_regular(path, "image") as f, Image.open(f) as image:
            image.load()  # every pixel: a truncated file fails here
            return parameters_of(image), image.size
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {str(path)!r} does not decode ({e})") from None


def parameters_of(image: Image.Image) -> str | None:
    """An opened picture's stored parameters (A1111's infotext): the PNG "parameters" chunk, or the EXIF user comment A1111 writes in JPEG/WebP."""
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(UNICODE_CODE):
        return comment[len(UNICODE_CODE) :].decode("utf-16-be", errors="replace")
    return None


# ---------------------------------------------------------------------------------------------
# Writing


def temporary_prefix(path: Path, pid: int | None = None) -> str:
    """``.<name>.<host>-<pid>.`` for a temporary file of ``path`` written by process ``pid`` (default: this one).

    The name is cut so that the prefix, mkstemp's 8 random characters and ``.part`` fit a 255-byte
    file name. The writer's host and pid tell a part left by a killed process (removable) from the
    live part of another run writing the same folder (never touched).
    """
    return f"{_name_prefix(path)}{_HOST}-{os.getpid() if pid is None else pid}."


def _name_prefix(path: Path) -> str:
    name = path.name.encode()[:TEMP_NAME_BYTES].decode(errors="ignore")
    return f".{name}."


# Room left for the host tag, a pid, mkstemp's 8 random characters, the dots and ".part" within 255 bytes.
TEMP_NAME_BYTES = 200
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]  # pids mean something on their own host only
_PART = re.compile(r"(\..*\.)([0-9a-f]{8})-(\d+)\.[a-z0-9_]+\.part")  # prefix, host, pid, mkstemp's characters


def remove_stale_parts(paths):
    """Remove the temporary files that killed processes of this host left for ``paths``; a live writer's are kept.

    One listing per folder, whatever the number of paths.
    """
    by_folder = {}
    for path in map(Path, paths):
        by_folder.setdefault(path.parent, set()).add(_name_prefix(path))
    for folder, prefixes in by_folder.items():
        _remove_stale(folder, prefixes.__contains__)


def remove_stale_parts_under(root):
    """Remove every temporary file that killed processes of this host left in ``root`` and its subfolders (a server's output folder at its start)."""
    for folder, _, _ in os.walk(root):
        _remove_stale(Path(folder), lambda prefix: True)


def _remove_stale(folder: Path, wanted):
    try:
        entries = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return
    for name in entries:
        match = _PART.fullmatch(name)
        if match and wanted(match[1]) and match[2] == _HOST and not _alive(int(match[3])):
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_image(picture, path: Path, parameters: str | None = None) -> Path:
    """Write a picture (PIL image or (H, W, 3) uint8) atomically: a temporary file in the same folder, then a rename.

    Ctrl-C or an error leaves no partial file, and an existing file is replaced only once the
    new one is complete. PNGs get the A1111 ``parameters`` text chunk. A file system error (disk
    full, a directory in the way, a name too long) raises WriteError naming the file.
    """
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    image = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture), "RGB")
    fmt = FORMATS[path.suffix.lower()]
    options = {}
    if fmt == "PNG" and parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)  # tEXt as A1111 writes it; PIL switches to UTF-8 iTXt when needed
        options["pnginfo"] = info
    elif parameters is not None:
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_CODE + parameters.encode("utf-16-be")
        options["exif"] = exif
    if fmt == "JPEG":
        options["quality"] = 95
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".part")
    except OSError as e:
        raise WriteError(f"cannot write {str(path)!r}: {_reason(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {str(path)!r}: {_reason(e)}; nothing was written there") from None
        raise
    return path


# What a user reads for the errors a write meets; any other errno gives the system's own text.
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for this file system",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "a directory of that name is in the way",
    errno.ENAMETOOLONG: "the name is too long for this file system",
    errno.ENOENT: "the folder does not exist",
}


def _reason(e: OSError) -> str:
    # os.replace onto a non-empty directory fails with ENOTEMPTY or EEXIST: the target is a directory.
    if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and e.filename2 is not None and Path(e.filename2).is_dir():
        return _REASONS[errno.EISDIR]
    return _REASONS.get(e.errno) or e.strerror or str(e)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
