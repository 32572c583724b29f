"""Small inputs for tests that build every registered model (shared by tests/models and tests/explain)."""

from __future__ import annotations

from typing import Any

import torch

from pneumoscope.models import PneumoNet, get_card

SIZE = 64


def small_kwargs(name: str) -> dict[str, Any]:
    """Builder arguments that make a fixed-size model (ViT) accept the small test input."""
    return {"image_size": SIZE} if get_card(name).fixed_input_size else {}


def random_input(model: PneumoNet, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.card.in_chans, SIZE, SIZE, generator=g)
