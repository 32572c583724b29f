"""The HTTP API (FastAPI) and the page at ``/``.

Endpoints (OpenAPI schema at ``/openapi.json``):

* ``POST /v1/predict``: multipart field ``files`` (one or more images: JPEG, PNG, DICOM; the
  content is decoded, the extension is not trusted) → per file: probabilities, decision,
  threshold, uncertainty, refer flag; plus the model id and version.
* ``POST /v1/explain``: the same plus a Grad-CAM overlay PNG (base64) of the decided class and
  the decoded image at the same size, for the page to stack with an opacity slider. An ONNX
  model uses the PyTorch weights exported beside it; without them: 409.
* ``GET /v1/model``: what model.json says (classes, threshold and its rule, temperature,
  metrics, preprocessing, weights source, version). ``GET /health``: liveness.

Defensive defaults, because a model server is an attack surface: binds 127.0.0.1; CORS off; a
request body over ``max_upload_bytes`` is refused (413) before it is read; images over
``max_pixels`` are refused from their header (422) so decompression bombs cost nothing; bad input
gets a 4xx ``{"error": ..., "file": ...}``, never a stack trace (unexpected failures are logged
and answered ``500 {"error": "internal error"}``); client file names are only echoed, never used
as paths; uploads are spooled by Starlette to the system temp dir and nothing else is written.
Uploads are decoded in their own small thread pool (at most ``MAX_DECODING`` at once), so under
load a bad file is still answered 422 rather than shed; all model use then goes through one lock
in a thread pool (PyTorch Grad-CAM hooks and the TTA seed are process-global state), bounded by
``timeout_s`` (504) and a queue limit (503: back-pressure, retry shortly).

Research and education only - not a diagnostic device.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

import pneumoscope
from pneumoscope.data.imageio import decode_image
from pneumoscope.errors import ImageDecodeError, ModelError
from pneumoscope.inference import Predictor, backend_of, load_predictor, model_version, pytorch_predictor

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 20_000_000
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_TIMEOUT_S = 60.0
#: Most files in one request, most requests waiting for the model at once, and most requests
#: being decoded at once (decoding is its own stage so that, under load, a bad upload is still
#: answered 422 instead of being shed with the good ones as 503).
MAX_FILES = 16
MAX_PENDING = 8
MAX_DECODING = 32
_NO_WEIGHTS = ("this model was exported to ONNX without its PyTorch weights (model.safetensors), which Grad-CAM "
               "needs; serve the checkpoint directory or re-export with weights")
NOTICE = "Research and education only \u2014 not a diagnostic device."
STATIC_DIR = Path(__file__).resolve().parent / "static"
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# --------------------------------------------------------------------------------------------
# response models (the OpenAPI schema)


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, one line")
    file: str | None = Field(None, description="the uploaded file it concerns, if any")


class FilePrediction(BaseModel):
    filename: str = Field(description="the client's file name, echoed (never used as a path)")
    probabilities: dict[str, float] = Field(description="temperature-calibrated probability per class")
    decision: str = Field(description="the decided class (binary: P(class 1) >= threshold)")
    threshold: float | None = Field(description="operating threshold on P(class 1), chosen on validation data")
    uncertainty: float = Field(description="predictive entropy of the probabilities, nats")
    refer: bool = Field(description="uncertainty above the model's refer threshold: show to a human reader")


class FileExplanation(FilePrediction):
    cam_class: str = Field(description="the class the Grad-CAM map explains (the decision)")
    cam_png_base64: str = Field(description="Grad-CAM overlay on the image, PNG, base64")
    image_png_base64: str = Field(description="the decoded image, same size as the overlay, PNG, base64")
    width: int
    height: int


class _Answer(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_id: str
    model_version: str = Field(description="first 12 hex digits of the SHA-256 of the network file")
    backend: Literal["pytorch", "onnx"]
    notice: str = NOTICE


class PredictResponse(_Answer):
    predictions: list[FilePrediction]


class ExplainResponse(_Answer):
    cam_method: str = "gradcam"
    predictions: list[FileExplanation]


class ModelInfo(_Answer):
    name: str = Field(description="architecture name in the model registry")
    run_name: str | None = None
    task: str | None = None
    classes: list[str]
    threshold: float | None
    threshold_rule: str | None = None
    temperature: float
    refer_threshold: float | None = None
    metrics: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                               description="scalar metrics stored in model.json (val_metrics, ...)")
    preprocessing: dict[str, Any]
    input: dict[str, Any] = Field(description="model input: size, channels, mean, std (on [0, 1])")
    pretrained_source: str | None = None
    pneumoscope_version: str
    explain_available: bool


class Health(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    status: Literal["ok"] = "ok"
    model_id: str
    model_version: str


_Files = Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, DICOM), field 'files'")]
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 408, 413, 422, 500, 503, 504)}


# --------------------------------------------------------------------------------------------
# errors


class ApiError(Exception):
    """An answer with a status and ``{"error", "file"}``; raised anywhere, rendered by a handler."""

    def __init__(self, status: int, error: str, file: str | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.file = status, error, file


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload too large (limit {limit:,} bytes per request)")


class _BodyTooSlow(StarletteHTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"request body not received within {seconds:g} s")


def _error(status: int, error: str, file: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=error, file=file).model_dump(), status_code=status)


class _LimitsMiddleware:
    """Pure ASGI: refuse bodies over ``max_bytes`` (by Content-Length before reading, else while
    streaming), time out idle body reads, and add security headers to every response."""

    def __init__(self, app, max_bytes: int, body_timeout: float = 30.0) -> None:  # noqa: ANN001
        self.app, self.max_bytes, self.body_timeout = app, max_bytes, body_timeout

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message) -> None:  # noqa: ANN001
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Content-Security-Policy", _CSP)
                headers.setdefault("Cache-Control", "no-store")
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                await _error(400, "invalid Content-Length header")(scope, receive, send_with_headers)
                return
            if too_big:
                await _error(413, f"upload too large: {int(length):,} bytes (limit {self.max_bytes:,} per request)")(
                    scope, receive, send_with_headers)
                return
        received = 0

        async def limited_receive():  # noqa: ANN202
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                raise _BodyTooSlow(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except (_BodyTooLarge, _BodyTooSlow) as exc:
            if started:
                raise
            await _error(exc.status_code, exc.detail)(scope, receive, send_with_headers)


# --------------------------------------------------------------------------------------------
# the model behind a lock


class ModelService:
    """The loaded predictor, its optional PyTorch twin for Grad-CAM, one lock and a thread pool."""

    def __init__(self, model_path: str | Path, *, max_pixels: int, timeout_s: float) -> None:
        self.predictor: Predictor = load_predictor(model_path)
        self.version = model_version(self.predictor)
        self.backend = backend_of(self.predictor)
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pneumoscope-infer")
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pneumoscope-decode")
        self._pending = 0
        self._decoding = 0

    def explain_available(self) -> bool:
        if self.backend == "pytorch":
            return True
        return bool(self.predictor.source_dir and (self.predictor.source_dir / "model.safetensors").exists())

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def run(self, uploads: list[tuple[str, bytes]], explain: bool) -> list[dict]:
        """Decode (own pool, own limit), then predict (and explain) under the model lock, each
        within ``timeout_s``. The counters are only touched on the event loop thread."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self._decoding >= MAX_DECODING:
            raise ApiError(503, "server busy: too many uploads being read; try again shortly")
        self._decoding += 1
        try:
            prepared = await asyncio.wait_for(loop.run_in_executor(self._decoder, self._decode, uploads),
                                              self.timeout_s)
        except TimeoutError:
            raise ApiError(504, f"inference did not finish within {self.timeout_s:g} s") from None
        finally:
            self._decoding -= 1
        if self._pending >= MAX_PENDING:
            raise ApiError(503, "server busy: too many requests waiting; try again shortly")
        self._pending += 1
        try:
            left = max(1e-6, self.timeout_s - (loop.time() - started))
            fut = loop.run_in_executor(self._executor, self._work, uploads, explain, prepared)
            return await asyncio.wait_for(fut, left)
        except TimeoutError:
            raise ApiError(504, f"inference did not finish within {self.timeout_s:g} s") from None
        finally:
            self._pending -= 1

    def _decode(self, uploads: list[tuple[str, bytes]]) -> tuple[list, Any]:
        """Decoded images and the model input; a bad upload is a 422 naming it."""
        images = []
        for name, data in uploads:
            try:
                images.append(decode_image(data, name=name, max_pixels=self.max_pixels))
            except ImageDecodeError as err:
                raise ApiError(422, err.reason, name) from None
        return images, self.predictor.prepare(images)

    def _cam_predictor(self) -> Predictor:
        try:
            cam_predictor = pytorch_predictor(self.predictor)
        except ModelError as err:
            log.warning("explain refused: %s", err)
            raise ApiError(409, _NO_WEIGHTS) from None
        try:
            import pneumoscope.explain.cam  # noqa: F401
            import pneumoscope.explain.overlay  # noqa: F401
        except ImportError as err:
            log.error("Grad-CAM unavailable: %s", err)
            raise ApiError(501, "Grad-CAM is not available in this installation") from None
        return cam_predictor

    def _work(self, uploads: list[tuple[str, bytes]], explain: bool, prepared: tuple[list, Any] | None = None
              ) -> list[dict]:
        from pneumoscope.predict import cam_overlays, png_bytes, predict_prepared

        images, u8 = prepared if prepared is not None else self._decode(uploads)
        p = self.predictor
        if not self._lock.acquire(timeout=self.timeout_s):
            raise ApiError(503, "server busy: the model is in use; try again shortly")
        try:
            cam_predictor = self._cam_predictor() if explain else None  # loads the twin once, under the lock
            res = predict_prepared(p, u8)
            pairs = cam_overlays(cam_predictor, u8, images, res.decision.tolist()) if cam_predictor else None
        finally:
            self._lock.release()
        out = []
        for i, (name, _) in enumerate(uploads):
            item: dict[str, Any] = {
                "filename": name,
                "probabilities": {c: float(res.probs[i, k]) for k, c in enumerate(p.class_names)},
                "decision": p.class_names[int(res.decision[i])],
                "threshold": p.threshold,
                "uncertainty": float(res.uncertainty[i]),
                "refer": bool(res.refer[i]),
            }
            if pairs is not None:
                gray, rgb = pairs[i]
                item.update(cam_class=item["decision"], width=int(gray.shape[1]), height=int(gray.shape[0]),
                            cam_png_base64=base64.b64encode(png_bytes(rgb)).decode("ascii"),
                            image_png_base64=base64.b64encode(png_bytes(gray)).decode("ascii"))
            out.append(item)
        return out


def _scalars(d: Any) -> dict[str, Any]:
    """Only the JSON-safe scalar entries of a metrics dict (NaN/inf become None)."""
    if not isinstance(d, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, bool) or v is None or isinstance(v, str):
            out[str(k)] = v
        elif isinstance(v, (int, float)):
            out[str(k)] = float(v) if math.isfinite(v) else None
    return out


def _model_info(svc: ModelService) -> ModelInfo:
    from pneumoscope.predict import refer_threshold

    p, meta = svc.predictor, svc.predictor.meta
    spec = meta.get("model") or {}
    card = spec.get("card") or {}
    metrics = {k.removesuffix("_metrics"): _scalars(v) for k, v in meta.items()
               if k.endswith("metrics") and isinstance(v, dict)}
    return ModelInfo(
        model_id=p.model_id, model_version=svc.version, backend=svc.backend, name=str(spec.get("name")),
        run_name=meta.get("run_name"), task=meta.get("task"), classes=p.class_names, threshold=p.threshold,
        threshold_rule=(p.threshold_info or {}).get("rule"), temperature=p.temperature,
        refer_threshold=refer_threshold(meta), metrics=metrics, preprocessing=p.spec.to_dict(),
        input={"size": p.spec.size, "channels": p.preset.in_chans, "mean": card.get("mean"), "std": card.get("std")},
        pretrained_source=meta.get("pretrained_source") or spec.get("pretrained_source"),
        pneumoscope_version=pneumoscope.__version__, explain_available=svc.explain_available(),
    )


def _clean_name(name: str | None, index: int) -> str:
    text = "".join(ch for ch in (name or "") if ch.isprintable())[:255]
    return text or f"file{index + 1}"


# --------------------------------------------------------------------------------------------
# the app


def create_app(model_path: str | Path, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               max_pixels: int = DEFAULT_MAX_PIXELS, cors_origins: list[str] | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S, docs: bool = False) -> FastAPI:
    """The FastAPI app serving ``model_path`` (run, checkpoint or exported directory).

    ``docs=True`` adds Swagger UI at ``/docs`` (it loads its scripts from a CDN, so it is off by
    default; the schema itself is always at ``/openapi.json``).
    """
    svc = ModelService(model_path, max_pixels=max_pixels, timeout_s=timeout_s)
    app = FastAPI(
        title="pneumoscope",
        version=pneumoscope.__version__,
        description=f"Pneumonia classification of chest radiographs. {NOTICE}",
        docs_url="/docs" if docs else None,
        redoc_url=None,
    )
    app.state.service = svc
    app.router.add_event_handler("shutdown", svc.close)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("%s %s -> %d %s%s", request.method, request.url.path, exc.status, exc.error,
                 f" ({exc.file})" if exc.file else "")
        return _error(exc.status, exc.error, exc.file)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:3]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        hint = " (send the images as multipart/form-data field 'files')" if request.url.path.startswith("/v1/") \
            else ""
        return _error(422, "invalid request: " + "; ".join(parts) + hint)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error")

    async def _read_uploads(files: list[UploadFile]) -> list[tuple[str, bytes]]:
        if not files:
            raise ApiError(422, "no files: send the image(s) as multipart/form-data field 'files'")
        if len(files) > MAX_FILES:
            raise ApiError(413, f"too many files: {len(files)} (at most {MAX_FILES} per request)")
        return [(_clean_name(f.filename, i), await f.read()) for i, f in enumerate(files)]

    def _answer(items: list[dict]) -> dict:
        p = svc.predictor
        return {"model_id": p.model_id, "model_version": svc.version, "backend": svc.backend, "predictions": items}

    @app.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS, tags=["inference"])
    async def predict(files: _Files) -> dict:
        """Probabilities, decision, uncertainty and refer flag for each uploaded image."""
        return _answer(await svc.run(await _read_uploads(files), explain=False))

    @app.post("/v1/explain", response_model=ExplainResponse,
              responses={**_ERRORS, 409: {"model": ErrorResponse}, 501: {"model": ErrorResponse}}, tags=["inference"])
    async def explain(files: _Files) -> dict:
        """Everything ``/v1/predict`` returns plus a Grad-CAM overlay of the decided class."""
        return _answer(await svc.run(await _read_uploads(files), explain=True))

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"])
    async def model_info() -> ModelInfo:
        """The model's description (from model.json)."""
        return _model_info(svc)

    @app.get("/health", response_model=Health, tags=["model"])
    async def health() -> Health:
        return Health(model_id=svc.predictor.model_id, model_version=svc.version)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(_LimitsMiddleware, max_bytes=max_upload_bytes)
    return app


def serve_command(model: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
                  max_upload_bytes: int = DEFAULT_MAX_UPLOAD, max_pixels: int = DEFAULT_MAX_PIXELS,
                  cors_origins: list[str] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                  log_level: str = "info") -> int:
    """Run the server with uvicorn until interrupted (CLI glue for ``pneumoscope serve``)."""
    import uvicorn

    app = create_app(model, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, cors_origins=cors_origins,
                     timeout_s=timeout_s)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the API is reachable from other machines and has no authentication; "
                    "put it behind an authenticating reverse proxy", host)
    log.info("serving %s on http://%s:%d/  (%s)", app.state.service.predictor.model_id, host, port, NOTICE)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), timeout_keep_alive=5,
                            limit_concurrency=64, server_header=False, proxy_headers=False)
    uvicorn.Server(config).run()
    return 0
