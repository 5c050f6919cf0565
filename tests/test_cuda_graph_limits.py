"""On CUDA the package sets MLX's CUDA-graph limits (bench/RESULTS.md section 11), keeps a user's values,
and leaves other backends alone. Each case runs in a fresh interpreter: the variables are read at import."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER")


def limits_after_import(cuda: bool, preset: dict) -> dict:
    code = (
        "import json, os, mlx.core as mx\n"
        f"mx.cuda.is_available = lambda: {cuda}\n"
        "import stable_diffusion\n"
        f"print(json.dumps({{k: os.environ.get(k) for k in {NAMES!r}}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    env.update(preset)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "cuda, preset, expected",
    [
        (True, {}, {"MLX_MAX_OPS_PER_BUFFER": "40", "MLX_MAX_MB_PER_BUFFER": "100"}),
        (True, {"MLX_MAX_OPS_PER_BUFFER": "7"}, {"MLX_MAX_OPS_PER_BUFFER": "7", "MLX_MAX_MB_PER_BUFFER": "100"}),
        (False, {}, {"MLX_MAX_OPS_PER_BUFFER": None, "MLX_MAX_MB_PER_BUFFER": None}),
    ],
    ids=["cuda_defaults", "cuda_user_value_kept", "not_cuda_untouched"],
)
def test_cuda_graph_limits_are_set_only_on_cuda_and_only_when_unset(cuda, preset, expected):
    assert limits_after_import(cuda, preset) == expected
