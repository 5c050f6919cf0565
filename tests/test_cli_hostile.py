"""Hostile input to the scripts (issue 23): each is one line on stderr and exit status 2 in bounded
time, or, for Ctrl-C, exit status 130 and one line; never a traceback, a hang or a file written."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from test_cli import ROOT, assert_usage_error, ok, params, run, start_until_denoising

T2I, I2I = "txt2image.py", "image2image.py"


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_an_input_image_that_is_not_a_regular_file_is_refused_without_blocking(tiny_sd1, tmp_path, kind):
    if kind == "fifo":
        source = tmp_path / "in.png"
        os.mkfifo(source)  # nobody writes to it: opening it to read would wait forever
    else:
        source = "/dev/zero" if kind == "device" else tmp_path
    start = time.monotonic()
    result = run(I2I, source, "p", "--model", tiny_sd1, "-o", tmp_path / "out.png")
    assert time.monotonic() - start < 60
    assert_usage_error(result, I2I, "is a FIFO|is a device|is a directory")
    assert not (tmp_path / "out.png").exists()


def test_an_upper_case_safetensors_checkpoint_is_taken_for_one(tmp_path):
    path = tmp_path / "MODEL.SAFETENSORS"
    save_file({"junk": np.zeros(1, "float32")}, str(path))
    result = run(T2I, "p", "--model", path, "-o", tmp_path / "out.png")
    # Not refused by its name (as a pickle before): the loader reads it and names what it lacks.
    assert "pickle" not in result.stderr and "never opened" not in result.stderr, result.stderr
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["a/b c", "a/b?", "own/er/name x", "a--b/c"])
def test_a_model_name_that_is_no_repo_id_is_one_line(tmp_path, name):
    result = run(T2I, "p", "--model", name, "-o", tmp_path / "out.png", env={"HF_HOME": str(tmp_path / "hf")})
    assert_usage_error(result, T2I, "no such folder or file|unknown model")


@pytest.mark.parametrize("cfg", ["1e308", "1000.5"])
def test_guidance_past_the_libraries_bound_is_refused_before_loading(tiny_sd1, tmp_path, cfg):
    result = run(T2I, "p", "--model", tiny_sd1, "--cfg", cfg, "-o", tmp_path / "out.png")
    assert_usage_error(result, T2I, r"--cfg .* is above 1000")


def test_guidance_at_the_bound_is_accepted(tiny_sd1, tmp_path):
    ok(run(T2I, "p", "--model", tiny_sd1, "--cfg", 1000, "--steps", 1, "--seed", 1, "-o", tmp_path / "out.png"))
    assert params(tmp_path / "out.png")["CFG scale"] == "1000"


@pytest.mark.parametrize("script", [T2I, I2I])
def test_ctrl_c_while_the_script_imports_is_one_line_and_130(script):
    # -X importtime reports each import as it completes: once numpy has loaded, the package (which
    # imports it, and MLX after it) is still loading. The interrupt lands inside the script's imports.
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", str(ROOT / script), "--help"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in process.stderr:
        if line.split("|")[-1].strip() == "numpy":
            break
    process.send_signal(signal.SIGINT)
    err = process.stderr.read()
    process.wait(timeout=60)
    said = [line for line in err.splitlines() if line.strip() and not line.startswith("import time:")]
    assert process.returncode == 130, err[-2000:]
    assert said == [f"{script}: interrupted"], err[-2000:]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_inside_a_long_step_acts_at_once(tiny_sd1, tmp_path, signum, status):
    """One 768x768 step of the tiny model computes for minutes on a CPU core; MLX checks no signal
    inside it, so the script must not wait for it to end (it did: 95 s measured on a bigger step)."""
    out = tmp_path / "out.png"
    process = start_until_denoising(T2I, "p", "--model", tiny_sd1, "--steps", 2, "--width", 768, "--height", 768, "--seed", 1, "-o", out)
    time.sleep(1.0)  # inside the first step's evaluation
    process.send_signal(signum)
    sent = time.monotonic()
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    waited = time.monotonic() - sent
    assert process.returncode == status, err
    assert waited < 10, f"the script took {waited:.1f} s to act on the signal"
    assert "Traceback" not in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
