"""`clipcap push`: what is uploaded (a complete model dir with its card), and failing at once, in one line, when the
Hub cannot be reached: offline, no token, a refused or a silent connection."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from clipcap import ClipCapError
from clipcap.push import PushConfig, push
from tests.cli_batch import REPO, assert_one_line_error


def run_push(model_dir, *extra, **env) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "clipcap.cli", "push", str(model_dir), "someone/clipcap-test", *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=300,
    )
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def test_offline_push_fails_at_once_in_one_line(model_dir):
    message = assert_one_line_error(run_push(model_dir, HF_HUB_OFFLINE="1", HF_TOKEN="hf_x"), "push")
    assert "offline (HF_HUB_OFFLINE is set)" in message


def test_push_without_a_token(model_dir, tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "HF_HOME": str(tmp_path)}
    assert "no Hugging Face token" in assert_one_line_error(run_push(model_dir, **env), "push")


@pytest.fixture()
def silent_server():
    """A TCP port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_unreachable_hub_is_one_line_and_a_silent_one_cannot_hang(model_dir, silent_server, tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_x", "HF_HOME": str(tmp_path)}
    refused = run_push(model_dir, HF_ENDPOINT=f"http://127.0.0.1:{port}", **env)
    assert "cannot push to someone/clipcap-test" in assert_one_line_error(refused, "push")
    endpoint, accepted = silent_server
    start = time.perf_counter()
    silent = run_push(model_dir, "--timeout", "2", HF_ENDPOINT=endpoint, **env)
    elapsed = time.perf_counter() - start
    assert "cannot push to someone/clipcap-test" in assert_one_line_error(silent, "push")
    assert accepted and elapsed < 240  # it reached the server, then gave up instead of waiting forever


def test_push_uploads_a_complete_dir_with_its_card(model_dir, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls["create_repo"] = (repo_id, private, exist_ok)

    def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
        calls["create_branch"] = (repo_id, branch)

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, **kwargs):
        files = {p.relative_to(folder_path).as_posix() for p in folder_path.rglob("*") if p.is_file()}
        calls["upload_folder"] = (repo_id, revision, commit_message, files)
        calls["config"] = json.loads((folder_path / "config.json").read_text())
        calls["card"] = (folder_path / "README.md").read_text()
        return "https://huggingface.co/someone/clipcap-test/commit/abc"

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    options = PushConfig(
        model_dir=str(model_dir), repo_id="someone/clipcap-test", private=True, revision="v1", license="mit"
    )
    assert push(options) == "https://huggingface.co/someone/clipcap-test/commit/abc"
    assert calls["create_repo"] == ("someone/clipcap-test", True, True)
    assert calls["create_branch"] == ("someone/clipcap-test", "v1")
    repo_id, revision, _, files = calls["upload_folder"]
    assert (repo_id, revision) == ("someone/clipcap-test", "v1")
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json"} <= files
    assert {"tokenizer.json", "model.py", "processing.py", "README.md"} <= files and "clip/config.json" not in files
    assert calls["config"]["vision_config"]["model_type"] == "clip_vision_model"  # made complete for the Hub
    meta = yaml.safe_load(calls["card"].split("---\n")[1])
    assert meta["pipeline_tag"] == "image-to-text" and meta["license"] == "mit"
    assert 'pipeline("image-text-to-text", model="someone/clipcap-test"' in calls["card"]  # it is complete
    assert not (model_dir / "README.md").exists()  # the user's dir is left as it was
    with pytest.raises(ClipCapError, match="`timeout` must be at least 0.001"):
        PushConfig(model_dir=str(model_dir), repo_id="someone/clipcap-test", timeout=0)
