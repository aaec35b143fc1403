"""The Ray engine: `caption` (with an output dir) and `embed` run by Ray Data actors on a Ray cluster.

A thin layer over the local path (`caption_job`, `embed`, `jobs`): the job's shards (shard i always holds the same
items in the same batches) are the unit of Ray work. The driver reads the inputs and claims the job as one local process
would (job.json refuses another command before the cluster is used), then runs a Ray dataset of the pending shard
numbers through `map_batches` with a callable class: each actor opens the job and loads the model or encoder once,
and writes each shard it is given atomically, exactly as a torchrun rank writes its own. A shard already written is
skipped, so a shard whose worker was killed is retried by Ray (the actor is restarted and the task resubmitted) and a
job stopped as a whole resumes when it is rerun; the driver writes info.json and the merged skip list once every shard
is written. The output equals the single-process output, whichever engine wrote which shard.

`CaptionBatches` is the entry point for a Ray pipeline of one's own: a callable class for `Dataset.map_batches` that
captions a column of images (paths, encoded bytes or decoded arrays) or of CLIP embeddings.

Ray is the optional extra `ray` (`pip install "clipcap-hf[ray]"`), imported only here and only when used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
from dataclasses import dataclass

import numpy as np

from .caption_job import CaptionJobConfig, CaptionJobResult, caption_shards, open_job
from .embed import EmbedConfig, EmbedResult, embed_shards, open_embed_job
from .errors import ClipCapError
from .options import check_options, option

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
EXTRA = 'pip install "clipcap-hf[ray]"'
PROBE_TIMEOUT_S = 10.0


@dataclass(kw_only=True)
class EngineOptions:
    """Where a sharded job runs: in this process (each torchrun rank taking its share), or on a Ray cluster."""

    engine: str = option(
        "local",
        choices=ENGINES,
        help="what runs the shards: local (this process; under torchrun each rank its share) or ray (Ray Data "
        "actors on a Ray cluster, each loading the model once; a shard whose worker dies is retried)",
    )
    ray_address: str | None = option(
        None,
        help="with engine ray: the cluster to run on (its head's host:port, ray://host:port, or auto for the one "
        "running on this machine)",
        default_text="RAY_ADDRESS, else a local cluster started for the job",
    )
    ray_workers: int | None = option(
        None,
        min=1,
        help="with engine ray: actors running shards at once, each holding its own copy of the model",
        default_text="as many as the cluster's CPUs (or GPUs / `num_gpus_per_worker`) allow",
    )
    num_gpus_per_worker: float = option(
        0.0, min=0, help="with engine ray: GPUs per actor (a fraction shares a GPU); 0 runs on CPUs"
    )

    def __post_init__(self) -> None:
        checks = getattr(super(), "__post_init__", None)  # a command's options: its own checks come first
        checks() if checks is not None else check_options(self)
        if self.engine != "ray":
            given = [f.name for f in dataclasses.fields(EngineOptions)[1:] if getattr(self, f.name) != f.default]
            if given:
                raise ClipCapError(f"`{given[0]}` applies to engine ray, not to engine {self.engine}")


def engine_options(options) -> EngineOptions:
    """The engine fields of `options` (an EngineOptions, or a command's options that include them)."""
    return EngineOptions(**{f.name: getattr(options, f.name) for f in dataclasses.fields(EngineOptions)})


def _own_fields(cfg, cls: type):
    """`cfg` as an instance of `cls` (a command's options minus the fields `cls` does not have), to send to actors."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def import_ray():
    """The `ray` module with Ray Data, or one error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine is Ray Data
    except ImportError:
        raise ClipCapError(f"the ray engine needs Ray Data, which is not installed: {EXTRA}") from None
    return ray


# -- the cluster ---------------------------------------------------------------------------------------------------
def _probe(address: str) -> None:
    """Refuse a cluster address that does not answer, at once: `ray.init` would wait minutes for it."""
    if address == "auto":
        return  # Ray finds the local cluster from its session files, or says there is none
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise ClipCapError(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ClipCapError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def preflight(options: EngineOptions) -> None:
    """What can be refused before a job is opened: Ray missing, or a cluster address that does not answer."""
    ray = import_ray()
    address = options.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and not ray.is_initialized():
        _probe(address)


def connect(options: EngineOptions) -> bool:
    """Join the Ray session: the caller's if Ray is already initialised, else the cluster at `ray_address`
    (or RAY_ADDRESS), else a new local cluster. Returns whether this call started the session (the caller shuts
    it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = options.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _probe(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as e:
        reason = "no Ray cluster is running on this machine" if address == "auto" else str(e).splitlines()[0]
        raise ClipCapError(f"cannot connect to the Ray cluster at {address}: {reason}") from None
    return True


def default_workers(options: EngineOptions) -> int:
    """Actors the cluster's resources allow: its CPUs, or its GPUs / `num_gpus_per_worker`."""
    ray = import_ray()
    resources = ray.cluster_resources()
    if options.num_gpus_per_worker > 0:
        gpus = resources.get("GPU", 0)
        if gpus < options.num_gpus_per_worker:
            raise ClipCapError(
                f"the Ray cluster has {gpus:g} GPUs, fewer than `num_gpus_per_worker` = {options.num_gpus_per_worker:g}"
            )
        return int(gpus // options.num_gpus_per_worker)
    return max(1, int(resources.get("CPU", 1)))


def _clipcap_error(error: BaseException) -> ClipCapError | None:
    """The ClipCapError an actor raised, from the remote traceback Ray Data reports it in (the exception object
    itself does not come back: Ray Data wraps it in a UserCodeException)."""
    found = re.findall(r"^clipcap\.errors\.ClipCapError: (.+)$", str(error), re.M)
    return ClipCapError(found[-1]) if found else None


def run_shards(worker: type, job_kwargs: dict, shards: list[int], options: EngineOptions, progress: bool) -> list:
    """Run `worker(**job_kwargs)` over `shards` on Ray Data (one shard per call) and return its output rows."""
    ray = import_ray()
    started = connect(options)
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars  # the caller's session's setting, given back afterwards
    try:
        context.enable_progress_bars = progress
        workers = min(options.ray_workers or default_workers(options), len(shards))
        dataset = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        dataset = dataset.map_batches(
            worker,
            fn_constructor_kwargs=job_kwargs,
            batch_size=1,
            # one shard at a time per actor: shards are long, and a queued one would wait behind another
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            # Ray Data's actors are restarted, and their tasks retried, whenever an actor dies
            num_gpus=options.num_gpus_per_worker or None,
        )
        try:
            return dataset.take_all()
        except Exception as e:
            found = _clipcap_error(e)
            if found is not None:
                raise found from None
            raise
    finally:
        context.enable_progress_bars = bars
        if started:
            ray.shutdown()


def _shard_column(batch) -> list[int]:
    return [int(s) for s in batch["shard"]]


def _actor_config(cfg, cls):
    """What an actor opens the job with: never `overwrite`, which the driver has already done; an actor starting the
    job over would delete the shards other actors wrote."""
    return _own_fields(dataclasses.replace(cfg, overwrite=False), cls)


def _drive(job, done, worker: type, cfg, options: EngineOptions, progress: bool) -> dict:
    """The driver's part of a job: every shard not yet `done` to `worker` actors (opened with `cfg`), then info.json
    and the merged skip report."""
    pending = [s for s in range(job.num_shards) if not done(s)]
    if pending:
        run_shards(worker, {"cfg": cfg}, pending, options, progress)
    info = job.finalize()
    if info is None:  # Ray reported success, so every shard must be on disk
        missing = [s for s in range(job.num_shards) if not done(s)]
        raise ClipCapError(f"shards {missing[:5]} of {cfg.out} were not written: rerun the same command")
    return info


# -- caption ---------------------------------------------------------------------------------------------------------
class CaptionShardWorker:
    """A Ray Data actor of a caption job: opens the job and loads the model once, then captions and writes each
    shard it is given (one not yet written), as a torchrun rank writes its own."""

    def __init__(self, cfg: CaptionJobConfig):
        self.job = open_job(cfg)

    def __call__(self, batch: dict) -> dict:
        shards = _shard_column(batch)
        wrote = caption_shards(self.job, shards)
        return {"shard": np.array(shards), "written": np.array([s in wrote for s in shards])}


def caption_job_ray(
    cfg: CaptionJobConfig, options: EngineOptions, progress: bool = False, worker: type = CaptionShardWorker
) -> CaptionJobResult:
    """`caption_job` on Ray Data: every shard not yet written, by `worker` actors; then info.json. `worker` is
    `CaptionShardWorker` or a subclass of it."""
    options = engine_options(options)
    preflight(options)  # before minutes of reading and loading, and before job.json is claimed
    # The driver checks the model on the CPU and lets it go: the actors hold the copies that caption.
    job = dataclasses.replace(open_job(cfg, load_device="cpu"), captioner=None)
    info = _drive(job, job.files.done, worker, _actor_config(cfg, CaptionJobConfig), options, progress)
    return CaptionJobResult(job.files.out, 0, 1, info)


# -- embed -----------------------------------------------------------------------------------------------------------
class EmbedShardWorker:
    """A Ray Data actor of an embed job: opens the job and loads the encoder once, then encodes and writes each
    shard it is given (one not yet written)."""

    def __init__(self, cfg: EmbedConfig):
        self.job = open_embed_job(cfg, clean_temporaries=False)  # other actors are writing

    def __call__(self, batch: dict) -> dict:
        shards = _shard_column(batch)
        wrote = embed_shards(self.job, shards)
        return {"shard": np.array(shards), "written": np.array([s in wrote for s in shards])}


def embed_ray(
    cfg: EmbedConfig, options: EngineOptions, progress: bool = False, worker: type = EmbedShardWorker
) -> EmbedResult:
    """`embed` on Ray Data: every shard not yet written, by `worker` actors; then info.json."""
    options = engine_options(options)
    preflight(options)
    job = dataclasses.replace(open_embed_job(cfg, clean_temporaries=True, load_device="cpu"), encoder=None)
    info = _drive(job, job.writer.shard_done, worker, _actor_config(cfg, EmbedConfig), options, progress)
    return EmbedResult(job.writer.path, 0, 1, info)


# -- a Ray pipeline's own dataset ----------------------------------------------------------------------------------
class CaptionBatches:
    """Captions a Ray Data batch, for `Dataset.map_batches`: the model is loaded once per actor.

        ds = ray.data.read_images("photos/", mode="RGB", include_paths=True)
        ds = ds.map_batches(CaptionBatches, fn_constructor_kwargs={"model": "my-model"}, batch_size=32,
                            compute=ray.data.ActorPoolStrategy(size=2))

    `column` holds images (decoded arrays as `read_images` gives them, encoded bytes, or paths) or, when it holds
    numeric vectors, CLIP embeddings of the model's encoder (captioned without one). Adds `caption` (or `captions`,
    a list per row, with `num_captions` > 1) and `caption_error`: why a row's image could not be read, else None.
    Decoding options (`num_beams`, `max_new_tokens`, ...) not given come from the model dir."""

    def __init__(
        self,
        model: str,
        column: str = "image",
        num_captions: int = 1,
        device: str = "auto",
        dtype: str | None = None,
        batch_size: int = 32,
        clip_model: str | None = None,
        **decoding,
    ):
        from .captioner import Captioner
        from .decoding import DecodingOptions

        options = DecodingOptions(**decoding)  # checked as the commands check them
        self.column, self.num_captions = column, num_captions
        self.captioner = Captioner.from_pretrained(
            model, clip_model=clip_model, device=device, dtype=dtype, batch_size=batch_size
        )
        self.decoding = self.captioner.decoding(options, num_captions)  # resolved and checked once, as jobs do

    def _images(self, values) -> tuple[list, dict[int, str]]:
        from PIL import Image

        from .images import ImageLoadError, open_image

        images, failed = [], {}
        for n, value in enumerate(values):
            try:
                if isinstance(value, np.ndarray) and value.dtype == np.uint8:
                    value = Image.fromarray(value)
                images.append(open_image(value, name=f"row {n}"))
            except ImageLoadError as e:
                images.append(None)
                failed[n] = e.reason
            except (TypeError, ValueError) as e:
                images.append(None)
                failed[n] = f"not an image ({type(e).__name__}: {e})"
        return images, failed

    def __call__(self, batch: dict) -> dict:
        import torch

        if self.column not in batch:
            raise ClipCapError(f"the batch has no column {self.column!r} (columns: {', '.join(batch)})")
        values = batch[self.column]
        vectors = np.asarray(values) if not isinstance(values, np.ndarray) else values
        failed: dict[int, str] = {}
        texts: list = []
        if vectors.ndim == 2 and np.issubdtype(vectors.dtype, np.floating):  # CLIP embeddings
            embeds = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
            texts = self.captioner.caption_with(embeds, self.decoding, self.num_captions)
        else:
            images, failed = self._images(list(values))
            good = [im for im in images if im is not None]
            size = self.captioner.batch_size  # preprocessed pixels for a chunk at a time, not the whole batch
            for i in range(0, len(good), size):
                inputs = self.captioner.model_inputs(self.captioner.encoder.preprocess(good[i : i + size]))
                texts += self.captioner.caption_with(inputs, self.decoding, self.num_captions)
        texts = iter(texts)
        captions, errors = np.empty(len(values), dtype=object), np.empty(len(values), dtype=object)
        for n in range(len(values)):
            captions[n] = None if n in failed else next(texts)
            errors[n] = failed.get(n)
        return {**batch, "caption" if self.num_captions == 1 else "captions": captions, "caption_error": errors}
