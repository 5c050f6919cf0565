"""Installing the package: the hint when MLX has no backend, and the console commands of an installed copy.

The install commands of the README themselves (a fresh virtual environment, ``pip install -e
".[cpu,test]"``) are run by ``.ci/run``; these tests check what an installed package offers.
"""

import os
import subprocess
import sys
from pathlib import Path

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
