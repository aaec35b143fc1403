"""HTTP serving: a FastAPI app over one Captioner, with dynamic micro-batching and hard limits on every input.

Requests flow: multipart upload -> size/count limits (`BodyLimit`, FastAPI's form limits) -> image opened and checked
from its header in a thread (pixel count before decoding) -> CLIP preprocessing in that thread -> bounded asyncio
queue -> `MicroBatcher` gathers concurrent requests (up to `max_batch_size` images or `max_wait_ms`), groups them by
decoding settings and runs each group as one batched encode + `generate` on a single worker thread, off the event loop.
"""

import asyncio
import contextlib
import logging
import logging.config
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

import torch
from PIL import Image

from .captioner import Captioner
from .decoding import DecodingOptions
from .devices import DEVICE_HELP
from .errors import ClipCapError
from .images import CORRUPT, FORMAT, NOT_AN_IMAGE, TOO_LARGE, ImageLoadError, open_image
from .limits import (
    MAX_BATCH_SIZE,
    MAX_BEAMS,
    MAX_CANDIDATES,
    MAX_CAPTIONS,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES_PER_REQUEST,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_QUEUE,
    MAX_REQUEST_SECONDS,
    MAX_TOP_P,
    MAX_UPLOAD_MB,
    MAX_WORKERS,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    context_length,
    room_for_new_tokens,
)
from .options import check_options, option
from .rerank import (
    RERANKERS,
    Scored,
    check_rerank,
    image_inputs,
    score_embeddings,
    text_tower_problem,
)
from .version import __version__

try:
    import anyio
    import uvicorn
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
except ImportError as e:  # pragma: no cover - depends on the install
    raise ClipCapError(
        f"serving needs the [serve] extra: pip install 'clipcap-hf[serve]' ({e.name} is missing)"
    ) from None

logger = logging.getLogger("clipcap.serve")

STATIC_DIR = Path(str(files("clipcap") / "static"))
DEFAULT_MAX_TOKENS = 100  # the longest caption a request may ask for, unless the LM's context leaves less


@dataclass(kw_only=True)
class ServerLimits(DecodingOptions):
    """Limits on every request, batching knobs, and the decoding defaults for requests that do not say."""

    max_batch_size: int = option(32, min=1, max=MAX_BATCH_SIZE, help="images per batched model run")
    max_wait_ms: float = option(
        10.0,
        min=0.001,
        max=MAX_REQUEST_SECONDS * 1000,
        help="how long a request waits for others to share its batch",
    )
    max_queue: int = option(256, min=1, max=MAX_QUEUE, help="requests waiting for the model before 503")
    max_images: int = option(16, min=1, max=MAX_IMAGES_PER_REQUEST, help="images per request")
    max_upload_mb: float = option(10.0, min=0.001, max=MAX_UPLOAD_MB, help="request body size limit in MB")
    max_pixels: int = option(
        MAX_IMAGE_PIXELS, min=1, max=MAX_IMAGE_PIXELS, help="pixels per image, checked before decoding"
    )
    timeout: float = option(
        60.0, min=0.001, max=MAX_REQUEST_SECONDS, help="per-request time limit in seconds, queueing included"
    )
    max_beams: int = option(8, min=1, max=MAX_BEAMS, help="the largest beam width a request may ask for")
    max_tokens: int | None = option(
        None,
        min=1,
        max=MAX_NEW_TOKENS,
        help="the longest caption (in tokens) a request may ask for; with the prefix it must fit the LM's context",
        default_text=f"{DEFAULT_MAX_TOKENS}, cut to what the LM's context leaves",
    )
    decode_workers: int = option(
        min(os.cpu_count() or 1, MAX_WORKERS), min=1, max=MAX_WORKERS, help="images opened and preprocessed at once"
    )

    def __post_init__(self) -> None:
        check_options(self)
        super().__post_init__()
        if self.num_beams is not None and self.num_beams > self.max_beams:
            raise ClipCapError(f"the default `num_beams` {self.num_beams} exceeds `max_beams` {self.max_beams}")
        if None not in (self.max_new_tokens, self.max_tokens) and self.max_new_tokens > self.max_tokens:
            raise ClipCapError(f"the default `max_new_tokens` {self.max_new_tokens} exceeds `max_tokens`")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass(kw_only=True)
class ServeConfig(ServerLimits):
    """`clipcap serve`: which model to serve, where, and the server's limits."""

    model: str = option(help="model dir (or HF Hub id) to serve")
    host: str = option("127.0.0.1", help="address to bind (the API has no authentication)")
    port: int = option(8000, min=0, help="port to bind")
    clip_model: str | None = option(None, help="CLIP encoder dir or id", default_text="the one the model config names")
    device: str = option("auto", help=DEVICE_HELP)
    dtype: str | None = option(
        None, choices=("float32", "float16", "bfloat16"), help="weights and compute dtype", default_text="as saved"
    )


@dataclass(frozen=True)
class DecodeSettings:
    """Requests with equal settings can share one batched generate run."""

    num_beams: int = 1
    max_new_tokens: int = 67
    num_captions: int = 1
    length_penalty: float = 1.0
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    prompt: str | None = None
    candidates: int | None = None
    rerank: str = "none"
    rerank_weight: float = 0.0

    def generate_kwargs(self) -> dict:
        own = ("num_captions", "candidates", "rerank", "rerank_weight")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in own}
        return {k: v for k, v in out.items() if v is not None}


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 and the API's JSON error body: at once when the declared
    Content-Length is over, and as soon as a streamed body goes over (as an HTTPException, which FastAPI renders)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> HTTPException:
        return HTTPException(413, f"request body over the limit of {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._error().detail}, status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited, send)


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

    def _run(self, pixels: torch.Tensor, settings: DecodeSettings) -> list[Scored]:
        """One Scored per image: the kept caption with its scores and runners-up (with several captions per
        image, all of them in the search's order)."""
        several = settings.num_captions > 1
        count = settings.num_captions if several else settings.candidates or 1
        inputs, features = image_inputs(self.captioner, pixels)
        return score_embeddings(
            self.captioner, inputs, features, settings.generate_kwargs(), count, settings.rerank,
            settings.rerank_weight, keep_order=several,
        )  # fmt: skip


# Formats a browser or phone produces. Everything else PIL could open (EPS runs Ghostscript, PSD, ...) is refused.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_STATUS = {FORMAT: 415, NOT_AN_IMAGE: 415, TOO_LARGE: 413, CORRUPT: 400}


def open_upload(data: bytes, filename: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Uploaded bytes -> RGB image, or HTTPException: 415 not a supported image, 413 too many pixels (read from
    the header, before anything is decoded), 400 empty / truncated / corrupt."""
    try:
        return open_image(data, name=filename, max_pixels=max_pixels, formats=ALLOWED_FORMATS)
    except ImageLoadError as e:
        raise HTTPException(_STATUS.get(e.kind, 400), f"{filename}: {e.reason}") from None


class ScoredCaption(BaseModel):
    caption: str
    clip_score: float | None
    logprob: float | None


class CaptionResult(BaseModel):
    filename: str
    captions: list[str]
    scores: list[ScoredCaption]  # each of `captions` with its CLIPScore and mean token log-probability
    candidates: list[ScoredCaption] | None = None  # the runners-up, with `candidates`


def _result(name: str, scored: Scored, several: bool, candidates: bool) -> CaptionResult:
    every = [ScoredCaption(**c.to_dict()) for c in scored.candidates]
    kept = every if several else every[:1]
    return CaptionResult(
        filename=name, captions=[c.caption for c in kept], scores=kept, candidates=every[1:] if candidates else None
    )


class CaptionResponse(BaseModel):
    results: list[CaptionResult]


class Health(BaseModel):
    status: str
    queued: int
    pending: int
    batches: int
    images: int
    limits: dict
    encoder: dict  # which encoder the model captions with: its path or id and the hash of its weights


class ErrorBody(BaseModel):
    detail: str


def startup_settings(captioner: Captioner, limits: ServerLimits) -> tuple[int, dict]:
    """The longest caption a request may ask for and the decoding settings of a request that asks for nothing,
    checked against the model: ClipCapError (the server refuses to start) for settings that would fail every
    request, such as `max_tokens` past what the LM's context leaves after the prefix, or a default prompt for an
    exported model."""
    context, prefix = context_length(captioner.model.lm.config), captioner.model.config.prefix_tokens
    room = room_for_new_tokens(context, prefix)
    if limits.max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    elif limits.max_tokens > room:
        raise ClipCapError(
            f"`max_tokens` {limits.max_tokens} does not fit the language model's context of {context} tokens after "
            f"the prefix ({prefix} tokens): at most {room}"
        )
    else:
        max_tokens = limits.max_tokens
    defaults = captioner.decoding(limits)
    if defaults["num_beams"] > limits.max_beams or defaults["max_new_tokens"] > max_tokens:
        raise ClipCapError(
            f"the default decoding settings (num_beams {defaults['num_beams']}, max_new_tokens "
            f"{defaults['max_new_tokens']}) exceed the server's limits (`max_beams` {limits.max_beams}, "
            f"`max_tokens` {max_tokens})"
        )
    return max_tokens, defaults


def create_app(captioner: Captioner, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app over an already loaded Captioner. The batching worker starts with the app's lifespan."""
    limits = limits or ServerLimits()
    max_tokens, defaults = startup_settings(captioner, limits)
    batcher = MicroBatcher(captioner, limits.max_batch_size, limits.max_wait_ms, limits.max_queue)
    no_text_tower = text_tower_problem(captioner.encoder)
    decode_limiter = anyio.CapacityLimiter(limits.decode_workers)

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
    app.state.limits = limits
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # Starlette re-raises after this response, so the server log gets the traceback; the client never does.
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    def prepare(data: bytes, filename: str) -> torch.Tensor:
        image = open_upload(data, filename, limits.max_pixels)
        try:
            return captioner.encoder.preprocess([image], [filename])
        except ImageLoadError as e:  # the processor would resize it past the bound
            raise HTTPException(_STATUS.get(e.kind, 400), f"{filename}: {e.reason}") from None

    errors = {code: {"model": ErrorBody} for code in (400, 413, 415, 503, 504)}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz", response_model=Health)
    async def healthz():
        """Liveness plus queue counters and the request limits (the upload page reads them)."""
        return Health(
            status="ok",
            encoder=captioner.encoder_info,
            queued=batcher.queued,
            pending=batcher.pending,
            batches=batcher.runs,
            images=batcher.images,
            limits={
                "max_images": limits.max_images,
                "max_upload_bytes": limits.max_upload_bytes,
                "max_pixels": limits.max_pixels,
                "max_beams": limits.max_beams,
                "max_new_tokens": max_tokens,
                "max_captions": MAX_CAPTIONS,
                "max_prompt_chars": MAX_PROMPT_CHARS,
                "num_beams": defaults["num_beams"],
                "default_new_tokens": defaults["max_new_tokens"],
            },
        )

    @app.post(
        "/v1/captions",
        response_model=CaptionResponse,
        responses=errors,
        form_limits={"max_files": limits.max_images, "max_fields": 20},
    )
    async def captions(
        image: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, WebP, GIF, BMP, TIFF)")],
        num_beams: Annotated[
            int | None, Form(ge=1, le=limits.max_beams, description="beam width (1: greedy); default: the server's")
        ] = None,
        max_new_tokens: Annotated[
            int | None, Form(ge=1, le=max_tokens, description="caption length limit; default: the server's")
        ] = None,
        num_captions: Annotated[
            int, Form(ge=1, le=MAX_CAPTIONS, description="captions per image, at most num_beams unless sampling")
        ] = 1,
        length_penalty: Annotated[
            float | None, Form(description="beam scores are divided by length**F (beam search only)")
        ] = None,
        do_sample: Annotated[bool, Form(description="sample instead of searching")] = defaults["do_sample"],
        temperature: Annotated[float | None, Form(ge=MIN_TEMPERATURE, description="sampling temperature")] = None,
        top_p: Annotated[float | None, Form(ge=0, le=MAX_TOP_P, description="nucleus sampling mass")] = None,
        top_k: Annotated[int | None, Form(ge=1, description="sample among the k most likely tokens")] = None,
        repetition_penalty: Annotated[
            float | None, Form(ge=MIN_REPETITION_PENALTY, description="penalty on repeated tokens")
        ] = None,
        prompt: Annotated[
            str | None, Form(max_length=MAX_PROMPT_CHARS, description="text each caption continues")
        ] = None,
        candidates: Annotated[
            int | None, Form(ge=1, le=MAX_CANDIDATES, description="candidate captions per image, at most num_beams")
        ] = None,
        rerank: Annotated[Literal[RERANKERS], Form(description="keep the search's best (none) or CLIP's (clip)")] = (
            "none"
        ),
        rerank_weight: Annotated[float, Form(allow_inf_nan=False, description="clip rerank: + F x logprob")] = 0.0,
    ) -> CaptionResponse:
        """Caption the uploaded images. Concurrent requests with equal settings share batched model runs."""
        beams = num_beams if num_beams is not None else defaults["num_beams"]
        if num_captions > beams and not do_sample:
            raise HTTPException(400, f"num_captions ({num_captions}) cannot exceed num_beams ({beams})")
        if candidates is not None and candidates > beams and not do_sample:
            raise HTTPException(400, f"candidates ({candidates}) cannot exceed num_beams ({beams})")
        try:
            check_rerank(candidates, rerank, rerank_weight)
        except ClipCapError as e:
            raise HTTPException(400, str(e).replace("`", "")) from None
        if candidates is not None and num_captions > 1:
            raise HTTPException(400, "candidates applies to one caption per image, not to num_captions > 1")
        if rerank == "clip" and no_text_tower:
            raise HTTPException(400, f"CLIP reranking needs the model's CLIP text tower: {no_text_tower}")
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        if not do_sample and any(v is not None for v in sampling.values()):
            raise HTTPException(400, "temperature, top_p and top_k only apply with do_sample")
        try:  # every setting is checked against the model before any upload is opened
            decoding = captioner.decoding(
                limits,
                num_captions,
                num_beams,
                max_new_tokens,
                length_penalty=length_penalty,
                do_sample=do_sample,
                repetition_penalty=repetition_penalty,
                prompt=prompt or None,
                **sampling,
            )
        except ClipCapError as e:
            raise HTTPException(400, str(e)) from None
        if batcher.full():  # refuse before spending time on decoding
            raise _overloaded()
        names = [f.filename or f"image {i + 1}" for i, f in enumerate(image)]
        pixels = []
        for name, upload in zip(names, image, strict=True):
            data = await upload.read()
            pixels.append(await anyio.to_thread.run_sync(prepare, data, name, limiter=decode_limiter))
        settings = DecodeSettings(
            num_captions=num_captions, candidates=candidates, rerank=rerank, rerank_weight=rerank_weight, **decoding
        )
        try:
            future = batcher.submit(torch.cat(pixels), settings)
        except Overloaded:
            raise _overloaded() from None
        try:
            result = await asyncio.wait_for(future, limits.timeout)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"captioning took longer than {limits.timeout:g} s; try again later") from None
        except Exception:
            logger.exception("captioning failed")
            raise HTTPException(500, "internal server error: captioning failed") from None
        several, listed = num_captions > 1, candidates is not None
        return CaptionResponse(results=[_result(n, s, several, listed) for n, s in zip(names, result, strict=True)])

    return app


def _overloaded() -> HTTPException:
    return HTTPException(503, "server busy: too many requests waiting", headers={"Retry-After": "1"})


def serve(cfg: ServeConfig) -> None:
    """Load the model once, then run the app with uvicorn until interrupted."""
    captioner = Captioner.from_pretrained(
        cfg.model, clip_model=cfg.clip_model, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.max_batch_size
    )
    app = create_app(captioner, cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the API has no authentication; put it behind a proxy you control", cfg.host)
    log_config = dict(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"] = {**log_config["loggers"], "clipcap": {"handlers": ["default"], "level": "INFO"}}
    logging.config.dictConfig(log_config)
    logger.info("model %s loaded on %s", cfg.model, captioner.device)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=log_config)
