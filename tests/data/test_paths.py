"""Tests for pairtrace.data.paths: locating the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

import pairtrace
from pairtrace.data.paths import SHARED_DATA_ENV, default_shared_data_dir, shared_data_dir
from pairtrace.errors import ConfigError


def test_env_variable_overrides_default(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    assert shared_data_dir() == tmp_path


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"shared data folder not found: .*nowhere \(set by PAIRTRACE_SHARED_DATA\)"):
        shared_data_dir()


def test_default_is_next_to_the_repository(monkeypatch):
    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    repo_root = Path(pairtrace.__file__).resolve().parents[2]
    default = default_shared_data_dir()
    assert default == repo_root.parent / "shared" / "data"
    if default.is_dir():
        assert shared_data_dir() == default
