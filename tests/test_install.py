"""Installing the package: the hint when MLX has no backend, and the console commands of an installed copy.

The install commands of the README themselves (a fresh virtual environment, ``pip install -e
".[cpu,test]"``) are run by ``.ci/run``; these tests check what an installed package offers.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_without_an_mlx_backend_names_the_extra_to_install(tmp_path):
    # What `pip install -e .` gives on Linux: the mlx wheel without libmlx.so, whose core module
    # fails to load with the dynamic linker's message.
    fake = tmp_path / "mlx"
    fake.mkdir()
    (fake / "core.py").write_text('raise ImportError("libmlx.so: cannot open shared object file: No such file or directory")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", "import stable_diffusion"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: MLX cannot be loaded (libmlx.so: cannot open shared object file")
    assert 'pip install -e ".[cpu]"' in last and 'pip install -e ".[cuda]"' in last
    # One error, not the linker's traceback chained to ours.
    assert result.stderr.count("Traceback") == 1, result.stderr


COMMANDS = ("sd-txt2image", "sd-image2image", "sd-triangle")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package as pip installs it (a built wheel, not the clone), under a folder of its own."""
    # Built from a copy of what the package is made of, so no build/ folder lands in the clone.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "stable_diffusion", source / "stable_diffusion", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("installed")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        timeout=600,
    )
    return target


def run_installed(installed: Path, command: str, *args, cwd: Path):
    # Outside the clone: only the installed copy can be imported.
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([str(installed / "bin" / command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_installed_package_has_the_commands_and_they_run_outside_the_clone(installed, tmp_path, command):
    result = run_installed(installed, command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {command} "), result.stdout


def test_installed_command_imports_the_installed_copy_and_names_itself_in_errors(installed, tmp_path):
    result = run_installed(installed, "sd-triangle", str(tmp_path / "fire.png"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"sd-triangle: error: no files {tmp_path}/fire_<limit>_<count>.png found; run image2image.py -gt (or -sd N) with -o {tmp_path}/fire.png first"
    probe = subprocess.run(
        [sys.executable, "-c", "import stable_diffusion; print(stable_diffusion.__file__)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True, timeout=120,
    )
    assert probe.stdout.strip() == str(installed / "stable_diffusion" / "__init__.py")


def test_top_level_script_keeps_its_name_in_errors(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "TriangularArray.py"), str(tmp_path / "fire.png")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("TriangularArray.py: error: no files "), result.stderr
