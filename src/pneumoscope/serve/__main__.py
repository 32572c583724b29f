"""``python -m pneumoscope.serve --model DIR [--host 127.0.0.1] [--port 8000]``: run the API server."""

from __future__ import annotations

import argparse
import logging
import sys

from pneumoscope.errors import PneumoscopeError


def main(argv: list[str] | None = None) -> int:
    from pneumoscope.serve.app import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD, DEFAULT_TIMEOUT_S, serve_command

    p = argparse.ArgumentParser(prog="python -m pneumoscope.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run, checkpoint or exported (ONNX) model directory")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request's inference")
    p.add_argument("--cors-origin", action="append", default=None, help="allow this browser origin (repeatable)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return serve_command(args.model, host=args.host, port=args.port, max_upload_bytes=args.max_upload_bytes,
                             max_pixels=args.max_pixels, cors_origins=args.cors_origin, timeout_s=args.timeout,
                             log_level=args.log_level)
    except PneumoscopeError as err:
        sys.stderr.write(f"pneumoscope serve: error: {err}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
