"""The REST API: captions equal the Captioner's, micro-batching, limits and bad uploads (each a 4xx, never a crash)."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import struct
import subprocess
import sys
import threading
import zlib

import httpx
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image

from clipcap import Captioner, ClipCapError, serve
from clipcap.cli import main
from clipcap.serve import DecodeSettings, MicroBatcher, Overloaded, ServerLimits, create_app, open_upload

COLOURS = [(220, 30, 30), (40, 170, 60), (40, 70, 220), (235, 200, 30), (140, 60, 180), (245, 130, 20)]


def png(colour=(220, 30, 30), size=(40, 30), fmt="PNG") -> bytes:
    img = Image.new("RGB", size, (240, 240, 240))
    img.paste(colour, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A greyscale PNG of width x height zeros: a few hundred KB that would decode to width*height bytes
    (only the first `rows` rows when given: a header that promises more than the file holds)."""
    row = b"\x00" * (width + 1)  # filter byte + pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height if rows is None else rows)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def files(*items):
    return [("image", (name, data, "image/png")) for name, data in items]


@pytest.fixture(scope="module")
def captioner(model_dir):
    return Captioner.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def client(captioner):
    config = ServerLimits(max_images=4, max_upload_mb=2, max_pixels=1_000_000, max_beams=4)
    with TestClient(create_app(captioner, config)) as c:
        yield c


@pytest.fixture(scope="module")
def bomb():
    return png_bomb(9000, 9000)  # 81 M pixels: over our 1 M limit, under PIL's own bomb error (179 M)


def test_captions_equal_the_captioners(client, captioner):
    images = [png(COLOURS[0]), png(COLOURS[2], (64, 64))]
    r = client.post("/v1/captions", files=files(("a.png", images[0]), ("b.png", images[1])), data={"max_new_tokens": 9})
    assert r.status_code == 200, r.text
    expected = captioner.caption([pil(b) for b in images], max_new_tokens=9)
    results = r.json()["results"]
    assert [(x["filename"], x["captions"]) for x in results] == [("a.png", [expected[0]]), ("b.png", [expected[1]])]
    for x in results:  # each caption with its scores (tests/test_rerank.py checks their values)
        assert [s["caption"] for s in x["scores"]] == x["captions"] and x["candidates"] is None
        assert x["scores"][0]["clip_score"] >= 0 and x["scores"][0]["logprob"] < 0


def test_beams_and_several_captions(client, captioner):
    image = png(COLOURS[3])
    r = client.post(
        "/v1/captions", files=files(("y.png", image)), data={"num_beams": 3, "num_captions": 2, "max_new_tokens": 7}
    )
    assert r.status_code == 200, r.text
    expected = captioner.caption([pil(image)], num_beams=3, num_return_sequences=2, max_new_tokens=7)
    assert [(x["filename"], x["captions"]) for x in r.json()["results"]] == [("y.png", expected[0])]
    assert [s["caption"] for s in r.json()["results"][0]["scores"]] == expected[0]
    assert len(expected[0]) == 2


def test_defaults_come_from_the_config(captioner):
    config = ServerLimits(max_new_tokens=5, num_beams=2)
    image = png(COLOURS[1])
    with TestClient(create_app(captioner, config)) as c:
        r = c.post("/v1/captions", files=files(("g.png", image)))
        assert r.json()["results"][0]["captions"] == captioner.caption([pil(image)], num_beams=2, max_new_tokens=5)
        assert c.get("/healthz").json()["limits"]["num_beams"] == 2


@pytest.mark.parametrize(
    "data, status, words",
    [
        ({"num_beams": 2, "num_captions": 3}, 400, "num_captions (3) cannot exceed num_beams (2)"),
        ({"num_beams": 5}, 422, "less than or equal to 4"),
        ({"num_beams": 0}, 422, "greater than or equal to 1"),
        ({"max_new_tokens": "many"}, 422, "valid integer"),
    ],
)
def test_bad_settings(client, data, status, words):
    r = client.post("/v1/captions", files=files(("a.png", png())), data=data)
    assert r.status_code == status
    assert words in r.text


def test_no_image_field_is_a_validation_error(client):
    r = client.post("/v1/captions", data={"num_beams": 1})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "image"]


def _truncated() -> bytes:
    data = png(size=(200, 200))
    return data[: len(data) // 2]


BAD_UPLOADS = {
    "garbage": (b"\x13\x37" * 500, 415, "not a supported image"),
    "text": (b"hello, I am not an image\n", 415, "not a supported image"),
    "unsupported format (PPM)": (png(fmt="PPM"), 415, "not a supported image"),
    "empty": (b"", 400, "empty file"),
    "truncated": (_truncated(), 400, "truncated"),
    "too many pixels": (png(size=(1001, 1000)), 413, "too many pixels (1001x1000 > 1000000"),
    "header of a 40000x40000 image": (png_bomb(40000, 40000, rows=2), 413, "decompression bomb"),
}


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_bad_uploads_get_their_4xx_and_the_server_lives_on(client, name):
    data, status, words = BAD_UPLOADS[name]
    r = client.post("/v1/captions", files=files((f"{name}.png", data)))
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert words in r.json()["detail"]
    assert "Traceback" not in r.text
    assert client.get("/healthz").json()["status"] == "ok"


def test_body_over_the_upload_limit_is_413(client):
    big = b"\x00" * (2 * 1024 * 1024)
    r = client.post("/v1/captions", files=files(("big.png", big)))
    # With a Content-Length, the limit answers before reading anything, in the API's JSON error form.
    over = {"detail": "request body over the limit of 2097152 bytes"}
    assert (r.status_code, r.headers["content-type"], r.json()) == (413, "application/json", over)
    head = b'--xx\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
    chunks = (head, big[: 1024 * 1024], big[1024 * 1024 :], b"\r\n--xx--\r\n")
    streamed = client.post(
        "/v1/captions", content=iter(chunks), headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    assert (streamed.status_code, streamed.json()) == (413, over)
    assert client.get("/healthz").status_code == 200


def test_bomb_is_refused_without_decoding(client, bomb):
    r = client.post("/v1/captions", files=files(("bomb.png", bomb)))
    assert r.status_code == 413
    assert "too many pixels (9000x9000 > 1000000" in r.json()["detail"]
    # PIL counts every image it allocates: the bomb is rejected from its header, a real image is decoded.
    created = Image.core.get_stats()["new_count"]
    with pytest.raises(HTTPException) as err:
        open_upload(bomb, "bomb.png", max_pixels=1_000_000)
    assert err.value.status_code == 413
    assert Image.core.get_stats()["new_count"] == created
    open_upload(png(), "ok.png", max_pixels=1_000_000)
    assert Image.core.get_stats()["new_count"] > created


def test_one_bad_image_rejects_the_request_and_names_it(client):
    r = client.post("/v1/captions", files=files(("ok.png", png()), ("notes.txt", b"not an image")))
    assert r.status_code == 415
    assert r.json()["detail"].startswith("notes.txt: ")


def test_too_many_images(client):
    r = client.post("/v1/captions", files=files(*[(f"{i}.png", png()) for i in range(5)]))
    assert r.status_code == 400
    assert "Maximum number of files is 4" in r.json()["detail"]


def test_generate_failure_is_a_500_without_traceback(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated CUDA out of memory")

    monkeypatch.setattr(client.app.state.batcher.captioner.model, "generate", broken)
    r = client.post("/v1/captions", files=files(("a.png", png())))
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error: captioning failed"}
    monkeypatch.undo()
    assert client.post("/v1/captions", files=files(("a.png", png()))).status_code == 200


def test_unexpected_errors_are_json_500s(captioner, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("simulated bug")

    monkeypatch.setattr(serve, "open_upload", broken)
    with TestClient(create_app(captioner), raise_server_exceptions=False) as c:
        r = c.post("/v1/captions", files=files(("a.png", png())))
        assert (r.status_code, r.json()) == (500, {"detail": "internal server error"})
        assert c.get("/healthz").status_code == 200


def test_page_health_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert 'fetch("/v1/captions"' in client.get("/static/app.js").text
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["limits"]["max_images"] == 4
    schema = client.get("/openapi.json").json()
    form = schema["paths"]["/v1/captions"]["post"]
    assert {"413", "415", "503", "504"} <= set(form["responses"])
    assert client.get("/docs").status_code == 200


# -- micro-batching ------------------------------------------------------------------------------------------------
def test_batcher_groups_queued_jobs_by_settings(captioner):
    images = [pil(png(c)) for c in COLOURS]
    a, b = DecodeSettings(1, 6, 1), DecodeSettings(2, 5, 2)
    plan = [(a, [0, 1]), (b, [2]), (a, [3]), (b, [4, 5])]

    async def run():
        batcher = MicroBatcher(captioner, max_batch_size=64, max_wait_ms=50)
        batcher.start()
        futures = [batcher.submit(captioner.encoder.preprocess([images[i] for i in idx]), s) for s, idx in plan]
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return batcher, results

    batcher, scored = asyncio.run(run())
    assert (batcher.runs, batcher.images, batcher.pending) == (2, 6, 0)  # one run per settings
    results = [[[c.caption for c in s.candidates] for s in job] for job in scored]
    greedy = captioner.caption([images[i] for i in (0, 1, 3)], max_new_tokens=6)
    beams = captioner.caption([images[i] for i in (2, 4, 5)], num_beams=2, num_return_sequences=2, max_new_tokens=5)
    assert results == [[[greedy[0]], [greedy[1]]], [beams[0]], [[greedy[2]]], [beams[1], beams[2]]]


def test_batcher_respects_max_batch_size_and_queue_bound(captioner):
    pixels = captioner.encoder.preprocess([pil(png())])

    async def run():
        batcher = MicroBatcher(captioner, max_batch_size=2, max_wait_ms=1000, max_queue=4)
        batcher.start()
        futures = [batcher.submit(pixels, DecodeSettings(1, 3, 1)) for _ in range(4)]
        with pytest.raises(Overloaded):
            batcher.submit(pixels, DecodeSettings(1, 3, 1))
        await asyncio.gather(*futures)
        await batcher.stop()
        return batcher

    batcher = asyncio.run(run())
    assert (batcher.runs, batcher.images) == (2, 4)


async def _until(condition) -> None:
    for _ in range(6000):  # a hang guard, not a timing assertion
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


def test_concurrent_requests_share_one_run(captioner):
    image = png(COLOURS[4])
    app = create_app(captioner, ServerLimits(max_batch_size=8, max_wait_ms=30_000))

    async def run():
        async with app.router.lifespan_context(app), _client(app) as c:
            posts = [
                c.post("/v1/captions", files=files((f"{i}.png", image)), data={"max_new_tokens": 8}) for i in range(8)
            ]
            return await asyncio.gather(*posts)

    responses = asyncio.run(run())
    expected = captioner.caption([pil(image)] * 8, max_new_tokens=8)
    assert [r.json()["results"][0]["captions"] for r in responses] == [[c] for c in expected]
    assert (app.state.batcher.runs, app.state.batcher.images) == (1, 8)


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_overload_is_503_with_retry_after_and_slow_requests_time_out(captioner):
    app = create_app(captioner, ServerLimits(max_batch_size=1, max_wait_ms=1, max_queue=1, timeout=600))
    batcher = app.state.batcher
    busy = threading.Event()

    async def run():
        async with app.router.lifespan_context(app), _client(app) as c:
            batcher.executor.submit(busy.wait)  # the model is busy with a long batch

            def post():
                return c.post("/v1/captions", files=files(("a.png", png())), data={"max_new_tokens": 3})

            first = asyncio.ensure_future(post())
            await _until(lambda: batcher.pending == 1 and batcher.queued == 0)  # taken, waiting for the model
            second = asyncio.ensure_future(post())
            await _until(lambda: batcher.queued == 1)  # the queue is full now
            refused = await post()
            busy.set()
            return refused, await first, await second, (await c.get("/healthz")).json()

    refused, first, second, health = asyncio.run(run())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {"detail": "server busy: too many requests waiting"}
    assert (first.status_code, second.status_code) == (200, 200)
    assert (health["pending"], health["queued"], health["batches"]) == (0, 0, 2)


def test_request_timeout_is_504_and_the_queued_job_is_dropped(captioner):
    config = ServerLimits(max_batch_size=1, max_wait_ms=1, timeout=600)
    app = create_app(captioner, config)
    batcher = app.state.batcher
    busy = threading.Event()

    async def run():
        async with app.router.lifespan_context(app), _client(app) as c:
            batcher.executor.submit(busy.wait)  # the model is busy with a long batch

            def post():
                return c.post("/v1/captions", files=files(("a.png", png())), data={"max_new_tokens": 3})

            first = asyncio.ensure_future(post())
            await _until(lambda: batcher.pending == 1 and batcher.queued == 0)  # taken, waiting for the model
            config.timeout = 0.05
            late = await post()  # waits in the queue behind `first` past its time limit
            config.timeout = 600
            busy.set()
            return late, await first, await post()

    late, first, after = asyncio.run(run())
    assert late.status_code == 504
    assert late.json() == {"detail": "captioning took longer than 0.05 s; try again later"}
    assert (first.status_code, after.status_code) == (200, 200)
    assert (batcher.runs, batcher.images, batcher.pending) == (2, 2, 0)  # the timed-out job never ran


# -- CLI -----------------------------------------------------------------------------------------------------------
def test_cli_serves_until_terminated(model_dir):
    """`clipcap serve` as users run it: the model loads once, uvicorn binds 127.0.0.1 (port 0: a free one), the API
    answers, SIGTERM shuts it down cleanly."""
    command = [sys.executable, "-m", "clipcap.cli", "serve", "--model", str(model_dir), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        for line in server.stdout:
            log.append(line)
            if "Uvicorn running on" in line:
                break
        url = re.search(r"http://127\.0\.0\.1:\d+", log[-1]).group(0)
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        r = httpx.post(f"{url}/v1/captions", files=files(("a.png", png())), data={"max_new_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["filename"] == "a.png"
    finally:
        server.terminate()
        log += server.communicate(timeout=60)[0].splitlines(keepends=True)
    assert server.returncode in (0, -signal.SIGTERM), "".join(log)  # uvicorn re-raises the signal once shut down
    assert sum("loaded on cpu" in line for line in log) == 1
    assert any("Application shutdown complete" in line for line in log)


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--max-batch-size", "--max-wait-ms", "--max-queue", "--max-images"):
        assert flag in out
    assert "127.0.0.1" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"clipcap serve: error: model directory not found: {tmp_path / 'missing'}"
    ]
    assert main(["serve", "--model", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be at least 1, got 0" in capsys.readouterr().err


def test_config_rejects_defaults_beyond_limits():
    with pytest.raises(ClipCapError):
        ServerLimits(num_beams=9, max_beams=8)
