"""The preprocessed-image cache: built once, reused, invalidated by content or parameters, repaired."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from pneumoscope.data.cache import ImageCache
from pneumoscope.data.imageio import decode_image
from pneumoscope.data.preprocess import PreprocessSpec, preprocess


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture()
def six_images(tmp_path, data_root, pick):
    files = pick(data_root, "train", "NORMAL", 3) + pick(data_root, "train", "PNEUMONIA", 3)
    out = []
    for f in files:
        dst = tmp_path / "imgs" / f.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(f, dst)
        out.append(dst)
    return out


def test_build_reuse_and_content(tmp_path, six_images):
    spec = PreprocessSpec(size=64)
    cache = ImageCache(tmp_path / "cache", spec)
    paths = [str(p) for p in six_images]
    hashes = [_sha(p) for p in six_images]
    r = cache.update(paths, hashes, progress=False)
    assert (r.added, r.reused, len(r.failed)) == (6, 0, 0)
    got = cache.get(hashes)
    assert got.shape == (6, 64, 64) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[2], preprocess(decode_image(six_images[2]), spec))
    # a new cache object over the same directory reuses everything (no decode)
    again = ImageCache(tmp_path / "cache", spec).update(paths, hashes, progress=False)
    assert (again.added, again.reused) == (0, 6)


def test_changed_parameters_and_changed_file_rebuild_only_what_changed(tmp_path, six_images):
    paths = [str(p) for p in six_images]
    hashes = [_sha(p) for p in six_images]
    ImageCache(tmp_path / "c", PreprocessSpec(size=64)).update(paths, hashes, progress=False)
    # another parameter set is another cache directory: everything is built for it
    other = ImageCache(tmp_path / "c", PreprocessSpec(size=64, clahe=True))
    assert other.dir != ImageCache(tmp_path / "c", PreprocessSpec(size=64)).dir
    assert other.update(paths, hashes, progress=False).added == 6
    # overwrite one file with another image: its content hash changes, only it is rebuilt
    shutil.copy(six_images[5], six_images[0])
    hashes2 = [_sha(p) for p in six_images]
    r = ImageCache(tmp_path / "c", PreprocessSpec(size=64)).update(paths, hashes2, progress=False)
    assert r.added == 0 and r.reused == 6  # the new content of file 0 equals file 5's, already cached


def test_killed_build_and_damaged_slot_are_detected(tmp_path, six_images):
    spec = PreprocessSpec(size=32)
    paths = [str(p) for p in six_images]
    hashes = [_sha(p) for p in six_images]
    cache = ImageCache(tmp_path / "c", spec)
    cache.update(paths, hashes, progress=False)
    # simulate a build killed after appending bytes but before writing the index
    with open(cache.data_path, "ab") as fh:
        fh.write(b"\x00" * 1000)
    reopened = ImageCache(tmp_path / "c", spec)
    assert reopened.data_path.stat().st_size == 6 * 32 * 32
    # damage one slot on disk: verify() finds it and update() repairs it
    with open(cache.data_path, "r+b") as fh:
        fh.seek(3 * 32 * 32 + 10)
        fh.write(b"\xff\xfe\xfd")
    c3 = ImageCache(tmp_path / "c", spec)
    assert c3.verify() == [3]
    r = c3.update(paths, hashes, progress=False)
    assert r.repaired == 1 and c3.verify() == []
    np.testing.assert_array_equal(c3.get([hashes[3]])[0], preprocess(decode_image(six_images[3]), spec))
    # a corrupt index is detected and the cache rebuilt
    (c3.dir / "index.json").write_text("{not json")
    c4 = ImageCache(tmp_path / "c", spec)
    assert len(c4) == 0
    assert c4.update(paths, hashes, progress=False).added == 6


def test_bad_files_are_reported_not_fatal(tmp_path, six_images):
    bad = tmp_path / "imgs" / "broken.jpeg"
    bad.write_bytes(six_images[0].read_bytes()[:200])
    paths = [str(p) for p in six_images] + [str(bad)]
    hashes = [_sha(p) for p in six_images] + [_sha(bad)]
    r = ImageCache(tmp_path / "c", PreprocessSpec(size=32)).update(paths, hashes, progress=False)
    assert r.added == 6 and list(r.failed) == [str(bad)]
