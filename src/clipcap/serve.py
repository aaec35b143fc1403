"""HTTP serving: a FastAPI app over one Captioner, with dynamic micro-batching and hard limits on every input.

Requests flow: multipart upload -> size/count limits (FastAPI's body and form limits) -> image opened and checked from
its header in a thread (pixel count before decoding) -> CLIP preprocessing in that thread -> bounded asyncio queue ->
`MicroBatcher` gathers concurrent requests (up to `max_batch_size` images or `max_wait_ms`), groups them by decoding
settings and runs each group as one batched encode + `generate` on a single worker thread, off the event loop.
"""

import asyncio
import contextlib
import io
import logging
import logging.config
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import torch
from PIL import Image, UnidentifiedImageError

from . import __version__
from .captioner import Captioner
from .encoder import MAX_IMAGE_PIXELS, ImageLoadError, load_image
from .errors import ClipCapError

try:
    import anyio
    import uvicorn
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
except ImportError as e:  # pragma: no cover - depends on the install
    raise ClipCapError(f"serving needs the [serve] extra: pip install 'clipcap[serve]' ({e.name} is missing)") from None

logger = logging.getLogger("clipcap.serve")

# Formats a browser or phone produces. Everything else PIL could open (EPS runs Ghostscript, PSD, ...) is refused.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
STATIC_DIR = Path(str(files("clipcap") / "static"))


@dataclass
class ServeConfig:
    """Server limits and batching knobs (the `clipcap serve` flags)."""

    max_batch_size: int = 32  # images per batched generate run
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # requests waiting for the model; more get 503 + Retry-After
    max_images: int = 16  # images per request
    max_upload_bytes: int = 10 * 1024 * 1024  # whole request body
    max_pixels: int = MAX_IMAGE_PIXELS  # per image, checked from the header before decoding
    timeout_s: float = 60.0  # per request, queueing included; 504 after
    max_beams: int = 8
    max_new_tokens: int = 100  # upper bound a client may ask for
    num_beams: int = 1  # defaults for requests that do not say (greedy, as the original's predictor)
    default_new_tokens: int = 67  # the original's caption length limit
    decode_workers: int = os.cpu_count() or 1  # images opened/preprocessed at once (bounds decode memory)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value <= 0:
                raise ClipCapError(f"serve setting {name} must be positive, got {value}")
        if self.num_beams > self.max_beams or self.default_new_tokens > self.max_new_tokens:
            raise ClipCapError("the default num_beams / max_new_tokens exceed their limits")


@dataclass(frozen=True)
class DecodeSettings:
    """Requests with equal settings can share one batched generate run."""

    num_beams: int = 1
    max_new_tokens: int = 67
    num_captions: int = 1


class Overloaded(Exception):
    """The request queue is full."""


@dataclass
class _Job:
    pixels: torch.Tensor  # (n, 3, H, W) preprocessed images of one request
    settings: DecodeSettings
    future: asyncio.Future


class MicroBatcher:
    """Gathers concurrent caption jobs into batched Captioner runs on one worker thread.

    `submit` is called on the event loop; the gathering loop takes the first waiting job, then more until
    `max_batch_size` images are gathered or `max_wait_ms` has passed, groups them by DecodeSettings and runs each
    group as one encode + generate on `executor` (one thread: the model runs one batch at a time)."""

    def __init__(self, captioner: Captioner, max_batch_size: int = 32, max_wait_ms: float = 10.0, max_queue: int = 256):
        self.captioner = captioner
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipcap-generate")
        self.runs = 0  # batched generate runs so far
        self.images = 0  # images captioned so far
        self.pending = 0  # accepted requests not yet answered
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="clipcap-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True, cancel_futures=True)

    def full(self) -> bool:
        return self._queue is not None and self._queue.full()

    def submit(self, pixels: torch.Tensor, settings: DecodeSettings) -> asyncio.Future:
        """Queue one request's images; the future resolves to one list of captions per image.
        Raises Overloaded when the queue is full."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(pixels, settings, future))
        except asyncio.QueueFull:
            raise Overloaded from None
        self.pending += 1
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future) -> None:
        self.pending -= 1

    async def _gather(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        size = len(jobs[0].pixels)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch_size:
            remaining = deadline - loop.time()
            try:
                if remaining > 0:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                else:  # past the deadline, still take whatever is already waiting
                    job = self._queue.get_nowait()
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            jobs.append(job)
            size += len(job.pixels)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            groups: dict[DecodeSettings, list[_Job]] = {}
            for job in await self._gather():
                if not job.future.done():  # timed out or abandoned while queued: skip the work
                    groups.setdefault(job.settings, []).append(job)
            for settings, jobs in groups.items():
                try:
                    pixels = torch.cat([job.pixels for job in jobs])
                    captions = await loop.run_in_executor(self.executor, self._run, pixels, settings)
                except Exception as e:  # reported to each waiting request; the loop goes on
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
                self.runs += 1
                self.images += len(captions)
                start = 0
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(captions[start : start + len(job.pixels)])
                    start += len(job.pixels)

    def _run(self, pixels: torch.Tensor, settings: DecodeSettings) -> list[list[str]]:
        embeds = self.captioner.model_inputs(pixels)
        out = self.captioner.caption_embeddings(
            embeds,
            num_beams=settings.num_beams,
            max_new_tokens=settings.max_new_tokens,
            num_return_sequences=settings.num_captions,
        )
        return [c if isinstance(c, list) else [c] for c in out]


def open_upload(data: bytes, filename: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Uploaded bytes -> RGB image, or HTTPException: 415 not a supported image, 413 too many pixels (read from
    the header, before anything is decoded), 400 empty / truncated / corrupt."""
    if not data:
        raise HTTPException(400, f"{filename}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise HTTPException(413, f"{filename}: too many pixels (decompression bomb)") from None
    except UnidentifiedImageError:
        kinds = ", ".join(ALLOWED_FORMATS)
        raise HTTPException(415, f"{filename}: not a supported image (accepted: {kinds})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise HTTPException(400, f"{filename}: corrupt image header ({e})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise HTTPException(413, f"{filename}: {width}x{height} is more than the {max_pixels} pixels allowed")
    try:
        return load_image(img, max_pixels=max_pixels)
    except ImageLoadError as e:
        raise HTTPException(400, f"{filename}: {e.reason}") from None


class CaptionResult(BaseModel):
    filename: str
    captions: list[str]


class CaptionResponse(BaseModel):
    results: list[CaptionResult]


class Health(BaseModel):
    status: str
    queued: int
    pending: int
    batches: int
    images: int
    limits: dict


class ErrorBody(BaseModel):
    detail: str


def create_app(captioner: Captioner, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app over an already loaded Captioner. The batching worker starts with the app's lifespan."""
    config = config or ServeConfig()
    batcher = MicroBatcher(captioner, config.max_batch_size, config.max_wait_ms, config.max_queue)
    decode_limiter = anyio.CapacityLimiter(config.decode_workers)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="clipcap",
        version=__version__,
        description="ClipCap image captioning (CLIP prefix + language model). Upload images, get captions.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.config = config
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # Starlette re-raises after this response, so the server log gets the traceback; the client never does.
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    def prepare(data: bytes, filename: str) -> torch.Tensor:
        return captioner.encoder.preprocess([open_upload(data, filename, config.max_pixels)])

    errors = {code: {"model": ErrorBody} for code in (400, 413, 415, 503, 504)}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz", response_model=Health)
    async def healthz():
        """Liveness plus queue counters and the request limits (the upload page reads them)."""
        return Health(
            status="ok",
            queued=batcher.queued,
            pending=batcher.pending,
            batches=batcher.runs,
            images=batcher.images,
            limits={
                "max_images": config.max_images,
                "max_upload_bytes": config.max_upload_bytes,
                "max_pixels": config.max_pixels,
                "max_beams": config.max_beams,
                "max_new_tokens": config.max_new_tokens,
                "num_beams": config.num_beams,
                "default_new_tokens": config.default_new_tokens,
            },
        )

    @app.post(
        "/v1/captions",
        response_model=CaptionResponse,
        responses=errors,
        max_body_size=config.max_upload_bytes,
        form_limits={"max_files": config.max_images, "max_fields": 16},
    )
    async def captions(
        image: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, WebP, GIF, BMP, TIFF)")],
        num_beams: Annotated[int, Form(ge=1, le=config.max_beams, description="beam width (1: greedy)")] = (
            config.num_beams
        ),
        max_new_tokens: Annotated[int, Form(ge=1, le=config.max_new_tokens, description="caption length limit")] = (
            config.default_new_tokens
        ),
        num_captions: Annotated[int, Form(ge=1, description="captions per image, at most num_beams")] = 1,
    ) -> CaptionResponse:
        """Caption the uploaded images. Concurrent requests with equal settings share batched model runs."""
        if num_captions > num_beams:
            raise HTTPException(400, f"num_captions ({num_captions}) cannot exceed num_beams ({num_beams})")
        if batcher.full():  # refuse before spending time on decoding
            raise _overloaded()
        names = [f.filename or f"image {i + 1}" for i, f in enumerate(image)]
        pixels = []
        for name, upload in zip(names, image, strict=True):
            data = await upload.read()
            pixels.append(await anyio.to_thread.run_sync(prepare, data, name, limiter=decode_limiter))
        settings = DecodeSettings(num_beams, max_new_tokens, num_captions)
        try:
            future = batcher.submit(torch.cat(pixels), settings)
        except Overloaded:
            raise _overloaded() from None
        try:
            result = await asyncio.wait_for(future, config.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"captioning took longer than {config.timeout_s:g} s; try again later") from None
        except Exception:
            logger.exception("captioning failed")
            raise HTTPException(500, "internal server error: captioning failed") from None
        return CaptionResponse(
            results=[CaptionResult(filename=n, captions=c) for n, c in zip(names, result, strict=True)]
        )

    return app


def _overloaded() -> HTTPException:
    return HTTPException(503, "server busy: too many requests waiting", headers={"Retry-After": "1"})


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    clip_model: str | None = None,
    device: str | None = None,
    config: ServeConfig | None = None,
) -> None:
    """Load the model once, then run the app with uvicorn until interrupted."""
    config = config or ServeConfig()
    captioner = Captioner.from_pretrained(model, clip_model=clip_model, device=device, batch_size=config.max_batch_size)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the API has no authentication; put it behind a proxy you control", host)
    log_config = dict(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"] = {**log_config["loggers"], "clipcap": {"handlers": ["default"], "level": "INFO"}}
    logging.config.dictConfig(log_config)
    logger.info("model %s loaded on %s", model, captioner.device)
    uvicorn.run(create_app(captioner, config), host=host, port=port, log_config=log_config)
