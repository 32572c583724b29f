"""Fixtures of the reliability tests: the hostile corpus and a tiny model to push it through."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest

from reliability.corpus import NO_READ_NAME, Corpus, build_corpus
from serve.helpers import make_checkpoint


@pytest.fixture(scope="session")
def _corpus(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("hostile") / "chest_xray", data_root)


@pytest.fixture()
def corpus(_corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> Corpus:
    """The hostile dataset (session-built, read-only for the tests).

    The file without read permission is ``chmod 000``; root reads such files anyway, so when the
    tests run as root the decoder's ``open`` is made to refuse it the way the kernel would refuse
    an ordinary user.
    """
    if os.geteuid() == 0:
        from pneumoscope.data import imageio

        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if isinstance(file, (str, os.PathLike)) and os.fspath(file).endswith(NO_READ_NAME):
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(imageio, "open", guarded_open, raising=False)
    return _corpus


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init cnn3 checkpoint root (the decisions do not matter here, only that files pass)."""
    return make_checkpoint(tmp_path_factory.mktemp("model") / "ckpt")
