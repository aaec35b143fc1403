"""The engine of the sharded commands (`caption --out`, `embed`) on the command line: the local path, or Ray."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..embed import EmbedConfig, EmbedResult, embed
from ..ray_engine import EngineOptions


@dataclass(kw_only=True)
class EmbedCommandConfig(EngineOptions, EmbedConfig):
    """What `embed` encodes, with which encoder, into which store, and what runs the shards."""


def quiet_ray() -> None:
    """Ray's and Ray Data's notices (cluster start, execution plans, log locations, a failed task's stack) are
    nothing a user acts on: what goes wrong comes back as an exception, which the CLI says in one line."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the C++ core's notices, read when Ray starts
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def run_embed_job(cfg: EmbedCommandConfig, progress: bool) -> EmbedResult:
    """`embed` on the engine `cfg` names."""
    if cfg.engine != "ray":
        return embed(cfg, progress)
    from ..ray_engine import embed_ray

    quiet_ray()
    return embed_ray(cfg, cfg, progress)
