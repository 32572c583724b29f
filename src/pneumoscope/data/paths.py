"""Where the dataset is: the ``--data`` value, else ``$PNEUMOSCOPE_DATA``, else a helpful error."""

from __future__ import annotations

import os
from pathlib import Path

from pneumoscope.errors import DatasetError

DATA_ENV_VAR = "PNEUMOSCOPE_DATA"

_WHERE_TO_GET = (
    "download the chest X-ray dataset from Kaggle \"chest-xray-pneumonia\" "
    "(paultimothymooney/chest-xray-pneumonia) or Mendeley Data doi:10.17632/rscbjbr9sj.2, "
    f"unpack it and pass its folder with --data PATH or set {DATA_ENV_VAR}=PATH"
)


def resolve_data_root(cli_value: str | None, *, environ: dict[str, str] | None = None) -> Path:
    """The dataset root (folder or CSV file) from the CLI value or the environment.

    ``environ`` defaults to ``os.environ``; it is a parameter so callers and tests can pass an
    explicit mapping. Raises :class:`DatasetError` saying where to get the data when nothing is
    set, and naming the path when it does not exist.
    """
    env = os.environ if environ is None else environ
    value = cli_value if cli_value else env.get(DATA_ENV_VAR, "")
    source = "--data" if cli_value else DATA_ENV_VAR
    if not value:
        raise DatasetError(f"no dataset given: {_WHERE_TO_GET}")
    root = Path(value).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: dataset path (from {source}) does not exist; {_WHERE_TO_GET}")
    return Path(os.path.abspath(root))
