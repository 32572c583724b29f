from __future__ import annotations

from pathlib import Path

import pytest

from pneumoscope.data.paths import DATA_ENV_VAR, resolve_data_root
from pneumoscope.errors import DatasetError


def test_cli_value_wins_over_environment(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {DATA_ENV_VAR: str(tmp_path / "b")}
    assert resolve_data_root(str(tmp_path / "a"), environ=env) == tmp_path / "a"
    assert resolve_data_root(None, environ=env) == tmp_path / "b"
    assert resolve_data_root("", environ=env) == tmp_path / "b"


def test_relative_and_dotdot_paths_become_absolute(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_data_root("data/../data", environ={}) == tmp_path / "data"


def test_nothing_given_says_where_to_get_the_data() -> None:
    with pytest.raises(DatasetError) as info:
        resolve_data_root(None, environ={})
    message = str(info.value)
    for needle in ('Kaggle "chest-xray-pneumonia"', "doi:10.17632/rscbjbr9sj.2", "--data PATH", DATA_ENV_VAR):
        assert needle in message


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'}: dataset path \\(from --data\\) does not exist"):
        resolve_data_root(str(tmp_path / "nope"), environ={})
    with pytest.raises(DatasetError, match=f"from {DATA_ENV_VAR}"):
        resolve_data_root(None, environ={DATA_ENV_VAR: str(tmp_path / "nope")})


def test_reads_process_environment_by_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert resolve_data_root(None) == tmp_path
