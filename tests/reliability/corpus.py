"""The hostile corpus: a Kermany-layout dataset where real X-rays sit beside every kind of file a
user, a broken download or an attacker can put in a folder (issue #9, "Bad input").

Built in a temporary folder from real images of ``../shared/data``; nothing is stored in the
repository. :class:`Corpus` says which files must be processed (``good``) and which must be
refused, with the words the one-line reason must contain (``bad``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from serve.helpers import make_dicom, png_bomb

#: A file name that is not valid UTF-8 (Latin-1 bytes), as a ``str`` with surrogate escapes.
NON_UTF8_NAME = os.fsdecode(b"caf\xe9-r\xf6ntgen.jpeg")
LONG_NAME = "x" * 245 + ".jpeg"  # 250 bytes: near the 255-byte limit of most file systems
NO_READ_NAME = "no-read-permission.jpeg"


@dataclass
class Corpus:
    root: Path  # the dataset (train/test × NORMAL/PNEUMONIA + an empty class folder)
    split_dir: Path  # root/test: the folder predict and evaluate read
    good: list[Path] = field(default_factory=list)  # under split_dir: must be predicted/evaluated
    bad: dict[Path, str] = field(default_factory=dict)  # under split_dir: path -> words of the reason
    train_good: list[Path] = field(default_factory=list)

    @property
    def no_read(self) -> Path:
        return next(p for p in self.bad if p.name == NO_READ_NAME)


def _png(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def hostile_files(src: Path, dest: Path, tmp: Path) -> tuple[list[Path], dict[Path, str]]:
    """Write the odd-but-valid and the invalid files into ``dest`` from the real JPEG ``src``."""
    dest.mkdir(parents=True, exist_ok=True)
    raw = src.read_bytes()
    gray = Image.open(src).convert("L")
    good: dict[str, bytes] = {
        "png-named.jpeg": _png(gray),  # wrong extension for the real format
        "gray16.png": _png(Image.fromarray((np.asarray(gray, np.uint16) * 257).astype(np.uint16))),
        "cmyk.jpeg": _jpeg(gray.convert("CMYK")),
        "palette.png": _png(gray.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)),
        "rgba.png": _png(gray.convert("RGBA")),
        "one-pixel.png": _png(Image.new("L", (1, 1), 128)),
        LONG_NAME: raw,
    }
    bad: dict[str, tuple[bytes, str]] = {
        "zero-bytes.jpeg": (b"", "empty file"),
        "truncated.jpeg": (raw[: len(raw) // 2], "truncated JPEG"),
        "truncated.png": (_png(gray)[:600], "PNG"),
        "error-page.jpeg": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n", "not an image"),
        "notes.png": (b"patient list\nname,age\nfoo,3\n" * 20, "not an image"),
        "bomb-40000x40000.png": (png_bomb(40000, 40000), "40000x40000"),
        NO_READ_NAME: (raw, "permission denied"),
        NON_UTF8_NAME: (raw, "not valid UTF-8"),  # cannot go into a CSV/Parquet table
    }
    good_paths, bad_paths = [], {}
    for name, data in good.items():
        (dest / name).write_bytes(data)
        good_paths.append(dest / name)
    for name, (data, reason) in bad.items():
        (dest / name).write_bytes(data)
        bad_paths[dest / name] = reason
    # DICOM: one with MONOCHROME1 pixels (valid, inverted), one without pixel data (invalid)
    good_paths.append(make_dicom(src, dest / "monochrome1.dcm", photometric="MONOCHROME1"))
    full = make_dicom(src, tmp / "with-pixels.dcm")
    import pydicom

    ds = pydicom.dcmread(full)
    del ds.PixelData
    ds.save_as(dest / "no-pixel-data.dcm")
    bad_paths[dest / "no-pixel-data.dcm"] = "no pixel data"
    os.chmod(dest / NO_READ_NAME, 0)
    return good_paths, bad_paths


def build_corpus(root: Path, data_root: Path, *, per_class: int = 4) -> Corpus:
    """The hostile dataset under ``root`` (see the module docstring)."""
    corpus = Corpus(root=root, split_dir=root / "test")
    for split, n in (("train", per_class * 2), ("test", per_class)):
        for cls in ("NORMAL", "PNEUMONIA"):
            d = root / split / cls
            d.mkdir(parents=True)
            for src in sorted((data_root / split / cls).glob("*.jpeg"))[:n]:
                (d / src.name).write_bytes(src.read_bytes())
                (corpus.train_good if split == "train" else corpus.good).append(d / src.name)
    (root / "test" / "EMPTY_CLASS").mkdir()  # an empty class folder
    for cls in ("NORMAL", "PNEUMONIA"):
        src = sorted((data_root / "test" / cls).glob("*.jpeg"))[per_class]
        good, bad = hostile_files(src, root / "test" / cls / "odd", root.parent)
        corpus.good += good
        corpus.bad.update(bad)
    # a symlink loop inside a class folder: test/NORMAL/odd/loop -> test/NORMAL
    os.symlink(root / "test" / "NORMAL", root / "test" / "NORMAL" / "odd" / "loop")
    return corpus
