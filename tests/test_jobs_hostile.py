"""Hostile inputs to the batch jobs (issue 23): FIFOs, devices, huge lists, seeds and files.

Each case asserts a bounded time and one clear line (ValueError in the library, exit 2 from the
scripts), or the correct result, and that nothing already written is lost.
"""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stable_diffusion import distributed, images

ROOT = Path(__file__).resolve().parents[1]
T2I = str(ROOT / "txt2image.py")
I2I = str(ROOT / "image2image.py")


@contextlib.contextmanager
def within_seconds(seconds: float):
    """Fail (instead of hanging or swapping for hours) when the block runs past ``seconds``."""

    def late(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, late)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(command, cwd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def one_line_exit_2(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), result.stderr


# ---------------------------------------------------------------------------------------------
# Huge jobs: refused past the limit before anything is listed, planned in linear time


@pytest.mark.parametrize("text", ["0-100000000", f"0-{distributed.MAX_IMAGES}", f"0-{2**64 - 1}"])
def test_parse_seeds_refuses_more_seeds_than_a_job_makes_before_listing_them(text):
    with within_seconds(5), pytest.raises(ValueError, match=f"a job makes at most {distributed.MAX_IMAGES} images"):
        distributed.parse_seeds(text)


def test_a_job_of_the_largest_size_plans_in_bounded_time():
    with within_seconds(5):  # the largest seed list, counted and listed
        assert len(distributed.parse_seeds(f"5,10-{distributed.MAX_IMAGES + 8}")) == distributed.MAX_IMAGES
    # A 10**6-line prompt file, one image each: items, batches and every rank's share. Linear work
    # takes a few seconds on a slow machine; the quadratic plan took hours.
    with within_seconds(60):
        items = distributed.make_items(distributed.MAX_IMAGES, [7])
        batches = distributed.make_batches(items, 8)
        assert [it.k for it in batches[-1]] == [distributed.MAX_IMAGES]
        assert sum(len(distributed.share(len(batches), rank, 4)) for rank in range(4)) == len(batches)
    with pytest.raises(ValueError, match=f"make {distributed.MAX_IMAGES + 2} images; a job makes at most"):
        distributed.make_items(distributed.MAX_IMAGES // 2 + 1, [1, 2])


# ---------------------------------------------------------------------------------------------
# Files that are not regular files, or too large to read


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)  # no writer ever opens it: opening it for reading blocks forever
    return path


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_list_or_image_that_is_not_a_regular_file_is_refused_at_once(tmp_path, fifo, kind):
    path = {"fifo": fifo, "device": Path("/dev/zero"), "directory": tmp_path}[kind]
    expected = {"fifo": "is a FIFO, not a regular file", "device": "is a device or socket, not a regular file", "directory": "is a directory"}[kind]
    with within_seconds(10):
        with pytest.raises(ValueError, match=f"--prompts file '{path}' {expected}"):
            distributed.read_list(str(path), "--prompts")
        with pytest.raises(ValueError, match=f"input image '{path}' {expected}"):
            images.load_image(str(path))


def test_a_list_file_past_the_limit_is_refused_without_reading_it(tmp_path):
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(10 * 2**30)  # 10 GB, sparse: reading it whole would take 10 GB of memory
    with within_seconds(10), pytest.raises(ValueError, match=f"'{huge}' is larger than 64 MB; split it"):
        distributed.read_list(str(huge), "--prompts")
    many = tmp_path / "many.txt"
    many.write_text("a\n" * (distributed.MAX_IMAGES + 1))
    with pytest.raises(ValueError, match=f"has {distributed.MAX_IMAGES + 1} lines; a job makes at most {distributed.MAX_IMAGES} images"):
        distributed.read_list(str(many), "--prompts")


def test_the_scripts_refuse_a_fifo_as_list_entry_or_input_image_in_one_line(tiny_sd1, tmp_path, fifo):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "inputs.txt").write_text(f"a.png\n{fifo}\n")
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        ([T2I, "--prompts", fifo], f"--prompts file '{fifo}' is a FIFO"),
        ([T2I, "--prompts", "/dev/zero"], "--prompts file '/dev/zero' is a device or socket"),
        ([I2I, "--images", fifo, "p"], f"--images file '{fifo}' is a FIFO"),
        ([I2I, "--images", "inputs.txt", "p"], f"input image '{fifo}' is a FIFO"),
        ([I2I, fifo, "p"], f"input image '{fifo}' is a FIFO"),
    ]
    for command, message in cases:
        result = run([sys.executable, *command, "--model", tiny_sd1, "--steps", 4, "-o", out / "o.png"], tmp_path, timeout=120)
        one_line_exit_2(result, message)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# --resume: only whole files of this job count as finished; temporary files of live writers stay


JOB = ["p", "--seeds", "1-4", "--steps", 2, "--width", 32, "--height", 32, "--no-float16"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_resume_makes_again_truncated_empty_and_foreign_files(tiny_sd1, tmp_path, ext):
    (tmp_path / "ref").mkdir()
    (tmp_path / "res").mkdir()
    reference = run([sys.executable, T2I, *JOB, "--model", tiny_sd1, "-o", f"ref/out.{ext}"], tmp_path)
    assert reference.returncode == 0, reference.stderr
    ref, res = tmp_path / "ref", tmp_path / "res"
    whole = ref / f"out_1.{ext}"
    (res / f"out_1.{ext}").write_bytes(whole.read_bytes())  # finished: kept as it is
    (res / f"out_2.{ext}").write_bytes((ref / f"out_2.{ext}").read_bytes()[:-40])  # truncated
    (res / f"out_3.{ext}").write_bytes(b"")  # empty
    (res / f"out_4.{ext}").write_bytes(whole.read_bytes())  # another job's image: its parameters name seed 1
    kept = (res / f"out_1.{ext}").stat().st_mtime_ns
    result = run([sys.executable, T2I, *JOB, "--model", tiny_sd1, "-o", f"res/out.{ext}", "--resume", "--grid", "--n_rows", 2], tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "--resume: 1 of 4 images already written, skipped" in result.stdout
    assert (res / f"out_1.{ext}").stat().st_mtime_ns == kept
    for k in range(1, 5):
        assert np.array_equal(pixels(res / f"out_{k}.{ext}"), pixels(ref / f"out_{k}.{ext}")), k
        assert images.read_parameters(res / f"out_{k}.{ext}") == images.read_parameters(ref / f"out_{k}.{ext}")
    grid = pixels(res / f"out.{ext}")
    if ext == "png":  # lossless: the grid holds the images exactly
        assert np.array_equal(grid[32:, 32:], pixels(ref / "out_4.png"))
    assert sorted(p.name for p in res.iterdir()) == sorted([f"out.{ext}"] + [f"out_{k}.{ext}" for k in range(1, 5)])


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid names no process (until the system reuses it)
    return process.pid


def test_only_parts_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "out_1.png"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / (images.temporary_prefix(out, alive.pid) + "abcdefgh.part")
        dead = tmp_path / (images.temporary_prefix(out, _dead_pid()) + "abcdefgh.part")
        other_host = tmp_path / (images.temporary_prefix(out, _dead_pid()).replace(images._HOST, "00000000") + "abcdefgh.part")
        other_name = tmp_path / (images.temporary_prefix(tmp_path / "out_2.png", _dead_pid()) + "abcdefgh.part")
        for part in (live, dead, other_host, other_name):
            part.write_bytes(b"\x89PNG half")
        images.remove_stale_parts([out])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_host, other_name))
    finally:
        alive.kill()
        alive.wait()
    images.remove_stale_parts([out])  # its writer is gone now
    assert not live.exists()


def test_a_plain_run_removes_the_part_a_killed_run_left(tiny_sd1, tmp_path):
    out = tmp_path / "out.png"
    stale = tmp_path / (images.temporary_prefix(out, _dead_pid()) + "abcdefgh.part")
    stale.write_bytes(b"\x89PNG half")  # as SIGKILL mid-save leaves it
    result = run([sys.executable, T2I, "p", "--steps", 2, "--width", 32, "--height", 32, "--model", tiny_sd1, "-o", out], tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
