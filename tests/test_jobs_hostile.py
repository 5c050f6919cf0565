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
