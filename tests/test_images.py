"""stable_diffusion/images.py: reading any picture as RGB, resizing, grids, A1111 metadata, safe writes."""

import errno
import io
import os

import numpy as np
import pytest
from PIL import Image

from stable_diffusion import cli, images
from stable_diffusion.cli import UsageError


def _save(tmp_path, image, name="in.png", **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


def test_rgba_and_la_are_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    out = np.asarray(images.load_image(_save(tmp_path, Image.fromarray(rgba, "RGBA"))))
    assert out.shape == (4, 4, 3)
    assert (out[:2] == [200, 0, 0]).all() and (out[2:] == 255).all()
    la = Image.fromarray(np.stack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert (np.asarray(images.load_image(_save(tmp_path, la, "la.png"))) == 255).all()


def test_palette_greyscale_and_cmyk_become_rgb(tmp_path):
    src = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgb = Image.fromarray(src, "RGB")
    for mode, name in (("P", "p.png"), ("L", "l.png"), ("CMYK", "c.jpg"), ("1", "b.png")):
        converted = rgb.convert(mode)
        out = images.load_image(_save(tmp_path, converted, name))
        assert out.mode == "RGB" and out.size == (8, 8)
        with Image.open(tmp_path / name) as ref:  # PIL's own conversion of what was saved
            expected = np.asarray(ref.convert("RGB"))
        assert np.array_equal(np.asarray(out), expected), mode


def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path):
    a = np.array([[0, 257 * 10, 65535, 257 * 128]], dtype=np.uint16)
    path = _save(tmp_path, Image.fromarray(a))  # PIL's 16-bit greyscale (I;16), as 16-bit PNGs open
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = np.asarray(images.load_image(path))
    assert out[0, :, 0].tolist() == [0, 10, 255, 128]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (6, 3), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path, image, "o.jpg", exif=exif)
    assert images.load_image(path).size == (3, 6)


@pytest.mark.parametrize(
    "content, phrase",
    [(None, "does not exist"), (b"hello, not an image", "not an image"), ("truncated", "corrupt or truncated")],
)
def test_bad_input_files_are_errors_naming_the_file(tmp_path, content, phrase):
    path = tmp_path / "bad.png"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG")
        content = buffer.getvalue()[:60]
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=phrase):
        images.load_image(path)
    with pytest.raises(ValueError, match="is a directory"):
        images.load_image(tmp_path)
    with pytest.raises(UsageError, match=phrase):
        cli.read_image(path)


@pytest.mark.parametrize("size", [(70, 50), (64, 48), (130, 201)])
def test_resize_to_the_vae_factor_is_what_diffusers_image_processor_makes(size):
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    ours = images.to_model_input(images.resize_to_multiple(image, 8))
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(image)[0].permute(1, 2, 0).numpy()
    assert ours.shape == ref.shape == (size[1] // 8 * 8, size[0] // 8 * 8, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_resize_refuses_when_asked_or_too_small():
    assert images.resize_to_multiple(Image.new("RGB", (128, 64)), 64, allow_resize=False).size == (128, 64)
    with pytest.raises(ValueError, match="--no-resize"):
        images.resize_to_multiple(Image.new("RGB", (130, 200)), 64, allow_resize=False)
    with pytest.raises(ValueError, match="at least 64 px"):
        images.resize_to_multiple(Image.new("RGB", (63, 500)), 64)


def test_grid_puts_images_in_reading_order():
    n, h, w = 6, 2, 3
    batch = np.stack([np.full((h, w, 3), i, np.uint8) for i in range(n)])
    g = images.grid(batch, n_rows=2)
    assert g.shape == (2 * h, 3 * w, 3)
    for i in range(n):
        r, c = divmod(i, 3)
        assert (g[r * h : (r + 1) * h, c * w : (c + 1) * w] == i).all()


def test_to_uint8_rounds_clips_and_blackens_nan():
    x = np.array([[[[0.0, 0.5, 1.2], [-0.1, np.nan, 1 / 255]]]], np.float32)
    assert images.to_uint8(x).tolist() == [[[[0, 128, 255], [0, 0, 1]]]]


# A1111's own infotext (modules/infotext_utils.py quotes values holding ',', ':' or newlines).
A1111_TEXT = (
    "a castle, on a hill\n"
    "Negative prompt: blurry, low quality\n"
    'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model: "C:\\\\models, v1", Denoising strength: 0.5'
)


def test_parameters_are_written_in_a1111_format():
    text = images.format_parameters(
        "a castle, on a hill",
        "blurry, low quality",
        Steps=20,
        Sampler="Euler a",
        CFG_scale=7,
        Seed=1234,
        Size="512x768",
        Model="C:\\models, v1",
        Denoising_strength=0.5,
        Skipped=None,
    )
    assert text == A1111_TEXT


def test_parameters_read_back_as_a1111_parses_them():
    parsed = images.parse_parameters(A1111_TEXT)
    assert parsed["Prompt"] == "a castle, on a hill"
    assert parsed["Negative prompt"] == "blurry, low quality"
    assert parsed["Steps"] == "20" and parsed["Sampler"] == "Euler a" and parsed["Seed"] == "1234"
    assert parsed["Model"] == "C:\\models, v1"
    assert images.parse_parameters("only a prompt")["Prompt"] == "only a prompt"


def test_png_carries_the_parameters_chunk(tmp_path):
    path = images.save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png", A1111_TEXT + " ünïcode ✓")
    with Image.open(path) as image:
        assert image.info["parameters"] == A1111_TEXT + " ünïcode ✓"
    assert images.save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.jpg", A1111_TEXT).exists()


@pytest.mark.parametrize("name", ["a.jpg", "a.webp"])
def test_jpeg_and_webp_carry_the_parameters_as_a1111_writes_them(tmp_path, name):
    text = A1111_TEXT + " ünïcode ✓"
    path = images.save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / name, text)
    with Image.open(path) as image:  # EXIF UserComment (tag 0x9286 of the Exif IFD): 8-byte code, then UTF-16
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment == b"UNICODE\0" + text.encode("utf-16-be")
    assert images.read_parameters(path) == text


def test_interrupted_write_leaves_the_old_file_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    images.save_image(np.full((8, 8, 3), 7, np.uint8), path)
    before = path.read_bytes()

    def interrupted_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        images.save_image(np.zeros((8, 8, 3), np.uint8), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.png"]


@pytest.mark.parametrize(
    "code, where, reason",
    [
        (errno.EROFS, "mkstemp", "the file system is read-only"),
        (errno.EFBIG, "fsync", "the file is too large for this file system"),
        (errno.ENOSPC, "fsync", "no space left on the device"),
        (errno.EDQUOT, "fsync", "the disk quota is exceeded"),
        (errno.EACCES, "mkstemp", "permission denied"),
        (errno.EIO, "fsync", "Input/output error"),  # any other errno: the system's own words
    ],
)
def test_a_write_error_names_its_true_reason(tmp_path, monkeypatch, code, where, reason):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))  # as the kernel raises it: no file name attached

    monkeypatch.setattr(images.tempfile if where == "mkstemp" else images.os, where, fail)
    with pytest.raises(images.WriteError) as raised:
        images.save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "out.png")
    assert str(raised.value).startswith(f"cannot write '{tmp_path / 'out.png'}': {reason}")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_in_the_way_is_named_as_such(tmp_path):
    (tmp_path / "out.png").mkdir()
    (tmp_path / "out.png" / "keep").write_text("")  # os.replace onto a non-empty directory
    with pytest.raises(images.WriteError, match="a directory of that name is in the way"):
        images.save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_output_path_checks(tmp_path):
    assert cli.check_output_path(str(tmp_path / "x.PNG")) == tmp_path / "x.PNG"
    with pytest.raises(UsageError, match="unknown image extension '.gif'"):
        cli.check_output_path(str(tmp_path / "x.gif"))
    with pytest.raises(UsageError, match="does not exist"):
        cli.check_output_path(str(tmp_path / "missing" / "x.png"))
    with pytest.raises(UsageError, match="is a directory"):
        (tmp_path / "d.png").mkdir()
        cli.check_output_path(str(tmp_path / "d.png"))
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        cli.check_output_path(str(tmp_path / "file" / "x.png"))


def test_sibling_names():
    from pathlib import Path

    assert images.sibling(Path("dir/out.png"), 20, 40) == Path("dir/out_20_40.png")
