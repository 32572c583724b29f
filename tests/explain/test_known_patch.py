"""The known-patch test: on a task decided by a bright square at a random position, Grad-CAM
must point at the square.

32x32 noise images; class 1 has a bright 8x8 square somewhere, class 0 has none. The registered
``cnn3`` (so the card's ``cam_layer`` path is exercised) is trained for a few dozen steps until the
loss is near zero (~2-25 s on a shared 2-core CPU). Then, for held-out class-1 images, the share of
CAM mass inside the square dilated by 2 px (12x12 = 14 % of the image) must exceed 50 %, i.e.
several times what an uninformative map would give.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoscope.explain.cam import compute_cams
from pneumoscope.models import create_model

S, P, DILATE = 32, 8, 2


def _batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = 0.15 * torch.randn(n, 1, S, S, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(0, S - P + 1, (n, 2), generator=g)
    for i in np.flatnonzero(y.numpy()):
        r, c = pos[i].tolist()
        x[i, 0, r : r + P, c : c + P] += 0.6
    return x, y, pos


@pytest.fixture(scope="module")
def patch_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("cnn3", num_classes=2, pretrained=False)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses: list[float] = []
    for step in range(300):
        x, y, _ = _batch(16, g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step >= 30 and np.mean(losses[-5:]) < 0.05:
            break
    model.zero_grad(set_to_none=True)
    return model.eval()


def test_model_learned_the_task(patch_model) -> None:
    x, y, _ = _batch(200, torch.Generator().manual_seed(1))
    with torch.no_grad():
        acc = (patch_model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.95


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cam_mass_lies_on_the_patch(patch_model, method: str) -> None:
    x, y, pos = _batch(64, torch.Generator().manual_seed(2))
    idx = np.flatnonzero(y.numpy())[:16]
    cams = compute_cams(patch_model, x[idx], target_class=1, method=method)
    shares, areas = [], []
    for cam, i in zip(cams, idx):
        r, c = pos[i].tolist()
        near = np.zeros((S, S), bool)
        near[max(0, r - DILATE) : r + P + DILATE, max(0, c - DILATE) : c + P + DILATE] = True
        shares.append(cam[near].sum() / cam.sum())
        areas.append(near.mean())
    assert np.mean(areas) < 0.15
    assert np.mean(shares) > 0.5, f"CAM mass on the patch: {np.round(shares, 2)}"
    assert np.median(shares) > 3 * np.mean(areas)
    # and the peak of each map is on (or right next to) the patch
    peaks = [np.unravel_index(cam.argmax(), cam.shape) for cam in cams]
    hits = [
        pos[i][0] - 4 <= pr < pos[i][0] + P + 4 and pos[i][1] - 4 <= pc < pos[i][1] + P + 4
        for (pr, pc), i in zip(peaks, idx)
    ]
    assert np.mean(hits) >= 0.8
