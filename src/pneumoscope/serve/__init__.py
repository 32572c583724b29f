"""HTTP API and a one-page web app for a trained or exported model (FastAPI + uvicorn).

``create_app(model_dir)`` builds the app; ``serve_command(model_dir)`` runs it on 127.0.0.1:8000;
``python -m pneumoscope.serve --model DIR`` does the same from a shell. See :mod:`.app`.
Research and education only - not a diagnostic device.
"""

from __future__ import annotations

__all__ = ["create_app", "serve_command"]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562: FastAPI is imported only when used
    if name in __all__:
        from pneumoscope.serve import app

        return getattr(app, name)
    raise AttributeError(name)
