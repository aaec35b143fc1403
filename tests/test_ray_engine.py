"""The Ray engine (`clipcap.ray_engine`, `--engine ray`): `caption --out` and `embed` on Ray Data give the output of
the single-process path, also when a worker process is SIGKILLed mid-run and when a stopped job is rerun; a Ray
pipeline's own `map_batches` with `CaptionBatches` (the README's example); the missing extra and an unreachable
cluster are one line each. One local Ray cluster (2 CPUs) serves the whole module."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipcap import Captioner
from clipcap.caption_job import CaptionJobConfig, caption_job
from clipcap.embed import EmbedConfig, embed
from clipcap.errors import ClipCapError
from clipcap.ray_engine import CaptionShardWorker, EmbedShardWorker, EngineOptions, caption_job_ray, embed_ray
from tests.hostile import clipcap, leftovers, one_line_error
from tests.test_sources import write_image

try:
    import ray
    import ray.data
except ImportError:
    ray = None

REPO = Path(__file__).resolve().parents[1]
needs_ray = pytest.mark.skipif(ray is None, reason='Ray Data is not installed (pip install "clipcap-hf[ray]")')
TOKENS = 5
RAY = EngineOptions(engine="ray", ray_workers=2)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs for this module; yields its address (for CLI runs that join it)."""
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False, logging_level="ERROR"
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    # The test's worker subclasses travel by value: Ray's workers need not import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A JSONL source of 9 images and two bad items (a missing file, a file that is not an image): 4 shards of 3."""
    root = tmp_path_factory.mktemp("ray-source")
    rows = []
    for i in range(9):
        write_image(root / f"{i}.png", seed=i)
        rows.append({"key": f"k{i}", "image": f"{i}.png", "caption": f"picture {i}."})
    rows.insert(4, {"key": "gone", "image": "missing.png", "caption": "x."})
    (root / "text.png").write_text("not an image")
    rows.append({"key": "text", "image": "text.png", "caption": "y."})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


def caption_cfg(inputs, model, out, **options) -> CaptionJobConfig:
    return CaptionJobConfig(
        inputs=[str(inputs)], model=str(model), out=str(out), max_new_tokens=TOKENS, batch_size=2, shard_size=3,
        workers=0, device="cpu", **options,
    )  # fmt: skip


def embed_cfg(source, clip, out) -> EmbedConfig:
    return EmbedConfig(source=str(source), out=str(out), clip_model=str(clip), batch_size=2, shard_size=3, workers=0)


def output(out: Path) -> dict:
    """Everything a caption job wrote, file by file (parquet shards as rows)."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name != "job.json":
            name = path.relative_to(out).as_posix()
            files[name] = pq.read_table(path).to_pylist() if path.suffix == ".parquet" else path.read_bytes()
    return files


def store_equal(a: Path, b: Path) -> None:
    """Two stores hold the same files: metadata and reports equal, embeddings equal to 1e-6."""
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file() and p.name != "job.json")
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.name != "job.json")
    for name in names:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(a / name), np.load(b / name), atol=1e-6, rtol=0)
        elif name.endswith(".parquet"):
            assert pq.read_table(a / name).to_pylist() == pq.read_table(b / name).to_pylist(), name
        else:
            assert (a / name).read_text() == (b / name).read_text(), name


@pytest.fixture(scope="module")
def local_captions(tmp_path_factory, source, varied_model_dir):
    """The single-process output every Ray caption run is compared with."""
    out = tmp_path_factory.mktemp("local") / "captions"
    info = caption_job(caption_cfg(source, varied_model_dir, out)).info
    assert info["num_captioned"] == 9 and info["num_skipped"] == 2 and info["num_shards"] == 4
    return output(out)


def keys(files: dict) -> list[str]:
    return [row["key"] for name, rows in files.items() if name.startswith("captions/") for row in rows]


class DiesOnce(CaptionShardWorker):
    """Kills its own process (SIGKILL) the first time it is given `shard`, leaving a half-written file behind."""

    marker: str = ""
    shard = 1

    def __call__(self, batch):
        if self.shard in [int(s) for s in batch["shard"]] and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            (self.job.files.captions_dir / f".part-{self.shard:05d}.parquet.tmp{os.getpid()}-dead").write_bytes(b"PAR")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


class EmbedDiesOnce(EmbedShardWorker):
    marker: str = ""
    shard = 2

    def __call__(self, batch):
        if self.shard in [int(s) for s in batch["shard"]] and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


class Stops(CaptionShardWorker):
    """Ends the job at `shard`, as a user's Ctrl-C or a lost driver would."""

    shard = 2

    def __call__(self, batch):
        if self.shard in [int(s) for s in batch["shard"]]:
            raise ClipCapError(f"stopped at shard {self.shard}")
        return super().__call__(batch)


# -- equal to the local path -----------------------------------------------------------------------------------------
@needs_ray
def test_caption_on_ray_equals_one_process(cluster, tmp_path, source, varied_model_dir, local_captions):
    result = caption_job_ray(caption_cfg(source, varied_model_dir, tmp_path / "out"), RAY)
    assert result.info["num_captioned"] == 9
    assert output(tmp_path / "out") == local_captions
    assert sorted(keys(local_captions)) == [f"k{i}" for i in range(9)]


@needs_ray
def test_caption_cli_joins_a_running_cluster(cluster, tmp_path, source, varied_model_dir, local_captions):
    argv = [source, "--model", varied_model_dir, "--out", tmp_path / "out", "--max-new-tokens", TOKENS]
    argv += ["--batch-size", 2, "--shard-size", 3, "--workers", 0, "--device", "cpu", "--quiet"]
    done = clipcap("caption", *argv, "--engine", "ray", "--ray-address", cluster, "--ray-workers", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert output(tmp_path / "out") == local_captions
    # rerun: every shard is there, so nothing is redone
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "captions").iterdir()}
    again = clipcap("caption", *argv, "--engine", "ray", "--ray-address", cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "captions").iterdir()} == written


@needs_ray
def test_embed_on_ray_equals_one_process(cluster, tmp_path, source, clip_dir):
    embed(embed_cfg(source, clip_dir, tmp_path / "local"))
    argv = [source, "--out", tmp_path / "ray", "--clip-model", clip_dir, "--batch-size", 2, "--shard-size", 3]
    done = clipcap("embed", *argv, "--workers", 0, "--quiet", "--engine", "ray", "--ray-address", cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    store_equal(tmp_path / "local", tmp_path / "ray")


# -- failures the engine recovers from -------------------------------------------------------------------------------
@needs_ray
def test_a_killed_worker_is_retried_and_every_key_written_once(
    cluster, tmp_path, source, varied_model_dir, local_captions
):
    DiesOnce.marker = str(tmp_path / "killed")
    result = caption_job_ray(caption_cfg(source, varied_model_dir, tmp_path / "out"), RAY, worker=DiesOnce)
    assert Path(DiesOnce.marker).is_file()  # the worker did die mid-run
    assert result.info["num_captioned"] == 9
    assert output(tmp_path / "out") == local_captions  # each key once, the dead worker's temporary gone
    assert not leftovers(tmp_path / "out")


@needs_ray
def test_embed_survives_a_killed_worker(cluster, tmp_path, source, clip_dir):
    embed(embed_cfg(source, clip_dir, tmp_path / "local"))
    EmbedDiesOnce.marker = str(tmp_path / "killed")
    embed_ray(embed_cfg(source, clip_dir, tmp_path / "ray"), RAY, worker=EmbedDiesOnce)
    assert Path(EmbedDiesOnce.marker).is_file()
    store_equal(tmp_path / "local", tmp_path / "ray")


@needs_ray
def test_a_stopped_job_resumes_without_redoing_written_shards(
    cluster, tmp_path, source, varied_model_dir, local_captions
):
    out = tmp_path / "out"
    cfg = caption_cfg(source, varied_model_dir, out)
    with pytest.raises(ClipCapError, match="stopped at shard 2"):
        caption_job_ray(cfg, EngineOptions(engine="ray", ray_workers=1), worker=Stops)
    written = {p.name: p.stat().st_mtime_ns for p in (out / "captions").glob("part-*")}
    assert "part-00002.parquet" not in written and not (out / "info.json").exists()
    caption_job_ray(cfg, RAY)
    assert output(out) == local_captions
    assert all((out / "captions" / name).stat().st_mtime_ns == ns for name, ns in written.items())


@needs_ray
def test_shards_written_by_a_torchrun_rank_are_kept(
    cluster, tmp_path, source, varied_model_dir, local_captions, monkeypatch
):
    """One layout for both engines: rank 0 of 2 writes its shards, the Ray engine finishes the job."""
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert caption_job(caption_cfg(source, varied_model_dir, out)).info is None
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert sorted(p.name for p in (out / "captions").iterdir()) == ["part-00000.parquet", "part-00002.parquet"]
    caption_job_ray(caption_cfg(source, varied_model_dir, out), RAY)
    assert output(out) == local_captions


# -- a Ray pipeline of one's own --------------------------------------------------------------------------------------
@needs_ray
def test_readme_example_runs_and_captions_like_the_captioner(cluster, tmp_path, varied_model_dir):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"<!-- ray-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 5  # the five lines the README promises
    (tmp_path / "photos").mkdir()
    for i in range(5):
        write_image(tmp_path / "photos" / f"{i}.png", seed=20 + i)
    code = code.replace('"/data/', f'"{tmp_path}/').replace('"/models/mine"', f'"{varied_model_dir}"')
    exec(compile(code, "README.md", "exec"), {})
    rows = pq.read_table(tmp_path / "captions").to_pylist()
    got = {Path(r["path"]).name: r["caption"] for r in rows}
    names = [f"{i}.png" for i in range(5)]
    expected = Captioner.from_pretrained(varied_model_dir).caption([tmp_path / "photos" / n for n in names])
    assert got == dict(zip(names, expected, strict=True))
    assert len(set(expected)) > 1  # the model tells these images apart: the comparison means something


@needs_ray
def test_caption_batches_reports_bad_rows_and_takes_embeddings(cluster, tmp_path, varied_model_dir):
    from clipcap.ray_engine import CaptionBatches

    good = [write_image(tmp_path / f"{i}.png", seed=30 + i).read_bytes() for i in range(3)]
    items = [{"image": good[0]}, {"image": b"not an image"}, {"image": good[1]}, {"image": good[2]}]
    kwargs = {"model": str(varied_model_dir), "max_new_tokens": TOKENS}
    rows = (
        ray.data.from_items(items)
        .map_batches(CaptionBatches, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=1))
        .take_all()
    )
    captioner = Captioner.from_pretrained(varied_model_dir)
    expected = captioner.caption([tmp_path / f"{i}.png" for i in range(3)], max_new_tokens=TOKENS)
    assert [r["caption"] for r in rows] == [expected[0], None, expected[1], expected[2]]
    assert [r["caption_error"] is None for r in rows] == [True, False, True, True]
    # a column of CLIP embeddings is captioned without reading an image
    vectors = np.random.default_rng(0).normal(size=(3, captioner.model.config.clip_dim)).astype(np.float32)
    rows = (
        ray.data.from_items([{"embedding": v} for v in vectors])
        .map_batches(
            CaptionBatches,
            fn_constructor_kwargs={**kwargs, "column": "embedding"},
            compute=ray.data.ActorPoolStrategy(size=1),
        )
        .take_all()
    )
    import torch

    expected = captioner.caption_embeddings(torch.from_numpy(vectors), max_new_tokens=TOKENS)
    assert [r["caption"] for r in rows] == expected


# -- hostile ---------------------------------------------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ray
@pytest.mark.parametrize(
    "address, fragment",
    [
        (lambda: f"127.0.0.1:{closed_port()}", "cannot reach the Ray cluster at 127.0.0.1:"),
        (lambda: "no-port-here", "is not host:port"),
        (lambda: "ray://127.0.0.1:notaport", "is not host:port"),
    ],
    ids=["unreachable", "no-port", "bad-port"],
)
def test_a_cluster_that_cannot_be_reached_is_one_line(tmp_path, source, varied_model_dir, address, fragment):
    for command in (
        ["caption", source, "--model", varied_model_dir, "--out", tmp_path / "c", "--device", "cpu"],
        ["embed", source, "--out", tmp_path / "e", "--clip-model", varied_model_dir / "clip"],
    ):
        done = clipcap(*command, "--engine", "ray", "--ray-address", address())
        one_line_error(done, fragment)


@needs_ray
def test_gpu_workers_on_a_cluster_without_gpus_is_one_error(cluster, tmp_path, source, varied_model_dir):
    options = EngineOptions(engine="ray", num_gpus_per_worker=0.5)
    with pytest.raises(ClipCapError, match="the Ray cluster has 0 GPUs, fewer than `num_gpus_per_worker` = 0.5"):
        caption_job_ray(caption_cfg(source, varied_model_dir, tmp_path / "out"), options)


def test_ray_options_need_the_ray_engine_and_an_output_dir(tmp_path, source, varied_model_dir):
    caption = ["caption", source, "--model", varied_model_dir]
    one_line_error(clipcap(*caption, "--out", tmp_path / "o", "--ray-workers", 2), "--ray-workers", "engine ray")
    one_line_error(clipcap(*caption, "--engine", "ray"), "--out")
    embed_argv = ["embed", source, "--out", tmp_path / "e", "--clip-model", "x"]
    one_line_error(clipcap(*embed_argv, "--num-gpus-per-worker", 1), "--num-gpus-per-worker", "engine ray")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_without_ray_the_engine_names_the_extra(tmp_path, source, varied_model_dir):
    """Ray made unimportable (a `ray` package that fails to import, first on the path), through the real CLI."""
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}
    for command in (
        ["caption", str(source), "--model", str(varied_model_dir), "--out", str(tmp_path / "c"), "--device", "cpu"],
        ["embed", str(source), "--out", str(tmp_path / "e"), "--clip-model", str(varied_model_dir / "clip")],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "clipcap.cli", *command, "--engine", "ray"], capture_output=True, text=True, env=env
        )
        one_line_error(done, 'pip install "clipcap-hf[ray]"')
        assert not Path(command[command.index("--out") + 1]).exists()  # said before anything was written


def test_actors_open_the_job_without_overwrite(tmp_path):
    """`overwrite` starts a job over once, in the driver; an actor that did it again would delete the shards that
    other actors had written."""
    from clipcap.ray_engine import _actor_config

    caption = CaptionJobConfig(inputs=["x"], model="m", out=str(tmp_path / "out"), overwrite=True)
    store = EmbedConfig(source="x", out=str(tmp_path / "store"), clip_model="c", overwrite=True)
    assert _actor_config(caption, CaptionJobConfig).overwrite is False
    assert _actor_config(store, EmbedConfig).overwrite is False
    assert _actor_config(caption, CaptionJobConfig).out == caption.out
