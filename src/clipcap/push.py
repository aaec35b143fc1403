"""Publishing a model dir on the Hugging Face Hub, with its model card.

The repo receives a complete captioning model (vision tower, mapper, LM, processor, generation config and the model
code), so `pipeline("image-text-to-text", model=REPO_ID, trust_remote_code=True)` works for anyone; a dir that is
not complete yet (its encoder named by `clip_model`) is made complete in a temporary dir first. The upload is
huggingface_hub's `upload_folder` (after `create_repo`, and `create_branch` for a new revision). Offline, or
without a token, it fails at once, before anything is read or sent; every request has connect and read timeouts.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .card import CARD_NAME, CardConfig, write_card
from .config import ClipCapConfig
from .errors import ClipCapError
from .options import check_options, option


@dataclass(kw_only=True)
class PushConfig:
    """What `clipcap push` uploads, and where."""

    model_dir: str = option(positional=True, help="model dir to upload")
    repo_id: str = option(positional=True, help="Hub repo to create or update, e.g. you/clipcap-coco")
    private: bool = option(False, help="create the repo private (an existing repo keeps its visibility)")
    revision: str | None = option(None, help="branch to push to, created when missing", default_text="the main branch")
    license: str = option("unknown", help="licence id written in the model card (mit, apache-2.0, ...)")
    commit_message: str = option("Upload ClipCap model", help="commit message")
    timeout: float = option(30.0, min=0.001, help="seconds to wait for the Hub to accept a connection or answer")

    def __post_init__(self) -> None:
        check_options(self)


def _session_timeouts(seconds: float) -> None:
    """huggingface_hub's shared HTTP client waits forever by default; a dead network must not hang a push."""
    from huggingface_hub import get_session

    session = get_session()
    session.timeout = type(session.timeout)(seconds, connect=seconds, read=seconds, write=seconds, pool=seconds)


def push(cfg: PushConfig) -> str:
    """Upload `cfg.model_dir` (made complete when needed) with a model card; returns the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise ClipCapError("cannot push to the Hugging Face Hub while offline (HF_HUB_OFFLINE is set)")
    if get_token() is None:
        raise ClipCapError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    model_dir = Path(cfg.model_dir)
    config = ClipCapConfig.from_pretrained(model_dir)  # a ClipCap model dir, before anything is sent
    with tempfile.TemporaryDirectory(prefix="clipcap-push-") as tmp:
        folder = model_dir
        if config.vision_config is None:
            from .captioner import Captioner

            folder = Captioner.from_pretrained(model_dir).save_pretrained(Path(tmp) / "model")
            for extra in ("metrics.json", CARD_NAME):
                if (model_dir / extra).is_file():
                    shutil.copy(model_dir / extra, folder / extra)
        if not (folder / CARD_NAME).is_file():
            write_card(
                CardConfig(
                    model_dir=str(model_dir),
                    out=str(folder / CARD_NAME),
                    repo_id=cfg.repo_id,
                    license=cfg.license,
                ),
                complete=True,  # the card describes what is uploaded
            )
        _session_timeouts(cfg.timeout)
        api = HfApi()
        try:
            api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
            if cfg.revision:
                api.create_branch(cfg.repo_id, branch=cfg.revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=cfg.repo_id,
                folder_path=folder,
                revision=cfg.revision,
                commit_message=cfg.commit_message,
            )
        except Exception as e:  # noqa: BLE001 - network, auth, quota, validation: all end the push the same way
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClipCapError(f"cannot push to {cfg.repo_id}: {reason}") from None
    return str(getattr(commit, "commit_url", commit))
