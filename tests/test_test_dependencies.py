"""A missing test dependency fails the run instead of skipping the tests that need it."""

import importlib.util

import pytest

import tiny_models


def test_a_missing_open_clip_fails_instead_of_skipping(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    with pytest.raises(pytest.fail.Exception, match="open_clip_torch is not installed"):
        tiny_models.bpe_path()


def test_a_missing_k_diffusion_fails_instead_of_skipping(monkeypatch):
    import kdiffusion_ref

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "k_diffusion" else real(name, *a))
    with pytest.raises(pytest.fail.Exception, match="k-diffusion is not installed"):
        kdiffusion_ref._package_dir()


def test_no_test_skips_itself():
    """Skips are decided by pytest's markers (cuda, fullsize), never by a test's own code."""
    from pathlib import Path

    calls = ("pytest." + "skip(", "importor" + "skip(")  # spelt apart so this file does not match itself
    for path in Path(__file__).parent.glob("*.py"):
        text = path.read_text()
        assert not any(call in text for call in calls), path.name
