"""pneumoscope: train, evaluate honestly, explain and deploy pneumonia classifiers for chest X-rays."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
