"""The FastAPI application: AUTOMATIC1111's ``/sdapi/v1`` routes, HTTP Basic auth, the page.

Routes follow A1111 v1.9/1.10 ``modules/api/api.py``. Handlers check a request (``generation.plan``)
and queue it (``jobs.Worker``); they never run MLX on the event loop, so ``/progress``,
``/interrupt`` and ``/skip`` answer while a job runs. A client that disconnects cancels its job.
Every error is A1111's JSON ``{"error", "detail"}`` with a 4xx status and one line; an unexpected
one is a 500 with the same shape and no traceback, and the server stays up.
"""

import asyncio
import base64
import binascii
import secrets
import sys
import traceback
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ModelLoadError, one_line
from ..sampler_names import SAMPLERS, SCHEDULE_LABELS, SCHEDULES, TABLE
from . import a1111, catalog, generation
from .a1111 import ApiError
from .jobs import Cancelled, Worker

STATIC = Path(__file__).parent / "static"
POLL_S = 0.2  # how often a waiting handler checks that its client is still there


def _error(status: int, error: str, detail: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def parse_auth(spec: str) -> dict:
    """``user:pass[,user2:pass2]`` (A1111's --api-auth) -> {user: password}."""
    credentials = {}
    for pair in spec.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth {spec!r}: expected user:password[,user2:password2]")
        credentials[user] = password
    return credentials


def _authorized(header: str, credentials: dict) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    # Browsers send UTF-8; requests and older clients Latin-1: a name and password match in either.
    for encoding in ("utf-8", "latin-1"):
        for name, expected in credentials.items():
            try:
                if user == name.encode(encoding) and secrets.compare_digest(password, expected.encode(encoding)):
                    return bool(sep)
            except UnicodeEncodeError:
                continue
    return False


def create_app(settings: generation.Settings, credentials: dict | None = None) -> FastAPI:
    app = FastAPI(title="stable-diffusion-mlx", docs_url=None, redoc_url=None, openapi_url=None)
    models = generation.Models(settings)
    worker = Worker()
    app.state.models, app.state.worker = models, worker

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.error, e.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        details = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', '')}" for err in e.errors())
        return _error(422, "ValidationError", one_line(details))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, "HTTPException", one_line(e.detail))

    async def body(request: Request):
        return a1111.parse_json(await request.body())

    async def wait(request: Request, job):
        """The job's result; cancels the job if the client disconnects while it waits or runs."""
        future = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({future}, timeout=POLL_S)
            if done:
                try:
                    return future.result()
                except Cancelled:
                    raise ApiError(499, "the client closed the connection; the job was cancelled") from None
                except ApiError:
                    raise
                except (ValueError, ModelLoadError) as e:  # the library's one-line refusals
                    raise ApiError(422, one_line(e), type(e).__name__) from None
            if await request.is_disconnected():
                job.cancel()

    async def generate(request: Request, mode: str):
        plan = await run_in_threadpool(generation.plan, mode, await body(request), models, settings)
        job = worker.submit(mode, lambda job: generation.run(job, plan, models, settings))
        return await wait(request, job)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate(request, "img2img")

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        snapshot = worker.progress.snapshot()
        if skip_current_image:
            snapshot["current_image"] = None
        return snapshot

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.progress.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        worker.progress.skip()
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {**models.options, "sd_model_checkpoint": models.current.title}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        changes = a1111.as_dict("options", await body(request))
        if "CLIP_stop_at_last_layers" in changes:
            value = a1111.as_int("CLIP_stop_at_last_layers", changes["CLIP_stop_at_last_layers"])
            if value < 1:
                raise ApiError(422, f"CLIP_stop_at_last_layers must be at least 1, got {value}")
            changes = {**changes, "CLIP_stop_at_last_layers": value}  # stored as the int the generations read
        if "show_progress_every_n_steps" in changes:  # A1111's preview period (0 or -1: no previews)
            every = a1111.as_int("show_progress_every_n_steps", changes["show_progress_every_n_steps"])
            changes = {**changes, "show_progress_every_n_steps": every}
        name = changes.get("sd_model_checkpoint")
        if name is not None:
            name = a1111.as_str("sd_model_checkpoint", name)
            models.find(name)  # an unknown name is refused before anything is queued
            await wait(request, worker.submit("load model", lambda job: generation.switch(job, models, name)))
        models.options.update({k: v for k, v in changes.items() if k != "sd_model_checkpoint"})
        return None

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [
            {"title": c.title, "model_name": c.model_name, "hash": None, "sha256": None, "filename": c.filename, "config": None}
            for c in models.listing
        ]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await run_in_threadpool(models.refresh)
        return None

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [
            {"name": row.a1111, "aliases": list(row.aliases), "options": {"scheduler": row.automatic} if row.automatic else {}}
            for row in TABLE
            if row.id in SAMPLERS
        ]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": s, "label": SCHEDULE_LABELS[s], "aliases": None, "default_rho": None, "need_inner_model": None} for s in SCHEDULES]

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return []

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return []

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return []

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/loras")
    async def loras():
        return await run_in_threadpool(catalog.loras, settings.lora_dir)

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        data = a1111.read_fields(await body(request), {"image": (a1111.as_str, "")})["image"]
        if not data:
            return {"info": "", "items": {}, "parameters": {}}
        image = await run_in_threadpool(a1111.decode_image, data.strip(), "image", settings.max_pixels)
        return a1111.png_info(image)

    @app.get("/")
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise ApiError(404, "the page is not installed (stable_diffusion/server/static/index.html)")
        return FileResponse(index)

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    app.add_middleware(Guard, credentials=credentials)
    return app


class Guard:
    """Basic auth on every path (the page and its files too), and JSON for any error that escapes a route.

    A plain ASGI middleware, not FastAPI's ``@app.middleware("http")``: that one wraps the request's
    ``receive``, and a handler then never hears that its client disconnected.
    """

    def __init__(self, app, credentials: dict | None):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.credentials and not _authorized(request.headers.get("authorization", ""), self.credentials):
            response = _error(401, "HTTPException", "Incorrect username or password", {"WWW-Authenticate": "Basic"})
            return await response(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # the server answers every request and stays up
            if started:
                raise
            await _internal(request, e)(scope, receive, send)


def _internal(request: Request, e: Exception) -> JSONResponse:
    """An error no check foresaw: logged with its traceback on the server's stderr, answered in one line."""
    print(f"error: {request.method} {request.url.path}: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
    traceback.print_exception(e, file=sys.stderr)
    return _error(500, type(e).__name__, one_line(e)[:300])
