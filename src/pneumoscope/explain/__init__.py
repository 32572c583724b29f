"""Explanations: Grad-CAM maps, overlays, galleries and a lung-field attention check.

Importing this package is cheap: the submodules (which import pytorch-grad-cam, OpenCV and
matplotlib) load on first use of one of their names (PEP 562).
"""
