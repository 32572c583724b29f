"""``pneumoscope gan sample``: synthetic images of one class (or all) as PNG files a dataset scan reads.

Layout of ``OUT``::

    NORMAL/synthetic_normal_s0_000000.png
    PNEUMONIA/synthetic_bacteria_s0_000000.png   (bacterial)   the words _bacteria_ / _virus_ in the
    PNEUMONIA/synthetic_virus_s0_000000.png      (viral)       name are how a scan reads the subtype
    samples.csv   path,label,subtype,patient_id,split,d_class,d_prob

``samples.csv`` is a dataset CSV in the sense of :func:`pneumoscope.data.scan.scan_dataset`
(``path,label[,patient_id,split]``; paths relative to the CSV), so ``pneumoscope data check
OUT/samples.csv`` and the trainer's ``data.synthetic`` option read it directly. Each synthetic
image is its own "patient" (``synthetic-<class>-s<seed>-<i>``). ``d_class``/``d_prob`` record what
the discriminator's own class head says about the image (a cheap check that the generator
produces the class it was asked for). Sampling the same class with the same seed again rewrites
the same files, so the CSV is a deterministic function of (GAN, class, n, seed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pneumoscope.data.loader import epoch_seed
from pneumoscope.errors import ConfigError
from pneumoscope.gan.acgan import to_uint8
from pneumoscope.gan.train import discriminator_logits, load_gan
from pneumoscope.utils.io import atomic_path

log = logging.getLogger(__name__)

#: three_class name -> (dataset label, the word a Kermany file name carries for it)
CLASS_FILES = {"normal": ("NORMAL", "normal"), "bacterial": ("PNEUMONIA", "bacteria"), "viral": ("PNEUMONIA", "virus")}
CSV_COLUMNS = ["path", "label", "subtype", "patient_id", "split", "d_class", "d_prob"]


@torch.no_grad()
def generate(gan, class_index: int, n: int, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """(n, size, size) uint8 images of one class; noise seeded by (seed, class) only, generator in eval mode."""
    g = torch.Generator().manual_seed(epoch_seed(seed, class_index, 31))
    gan.generator.eval()
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn(b, gan.z_dim, generator=g)
        out.append(to_uint8(gan.generator(z, torch.full((b,), class_index, dtype=torch.long)))[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros((0, gan.size, gan.size), np.uint8)


def sample_command(gan_dir: str | Path, class_name: str, n: int, out: str | Path, *, seed: int = 0) -> pd.DataFrame:
    """Write ``n`` images of ``class_name`` (``normal``/``bacterial``/``viral``/``all``) to ``out``; returns the CSV rows."""
    from PIL import Image

    gan, meta, _ = load_gan(gan_dir)
    names = [c.lower() for c in meta["class_names"]]
    wanted = names if class_name.lower() == "all" else [class_name.lower()]
    for c in wanted:
        if c not in names or c not in CLASS_FILES:
            raise ConfigError(f"--class {class_name!r}: choose one of {', '.join(names)} or all")
    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    out = Path(out)
    rows = []
    for c in wanted:
        k = names.index(c)
        label, word = CLASS_FILES[c]
        imgs = generate(gan, k, n, seed=seed)
        d_probs = torch.softmax(torch.from_numpy(discriminator_logits(gan, imgs)), 1).numpy()
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            rel = f"{label}/synthetic_{word}_s{seed}_{i:06d}.png"
            with atomic_path(out / rel) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
            rows.append({"path": rel, "label": label, "subtype": c, "patient_id": f"synthetic-{c}-s{seed}-{i}",
                         "split": "train", "d_class": names[int(d_probs[i].argmax())], "d_prob": float(d_probs[i, k])})
        agree = float(np.mean(d_probs.argmax(1) == k))
        log.info("%d %s images written to %s; the discriminator's class head agrees on %.1f %%", n, c, folder,
                 100 * agree)
    new = pd.DataFrame(rows, columns=CSV_COLUMNS)
    csv = out / "samples.csv"
    if csv.exists():
        old = pd.read_csv(csv, dtype=str, keep_default_na=False)
        new = pd.concat([old[~old["path"].isin(new["path"])], new.astype(str)], ignore_index=True)
    with atomic_path(csv) as tmp:
        new.to_csv(tmp, index=False)
    return new
