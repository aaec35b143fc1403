"""Every count, length and size a user controls is bounded by `clipcap.limits`, checked before work starts, through
the real CLI, the HTTP API and the Python API: one clear error naming the value and the bound, never an internal
error, a crash or a machine-sized allocation."""

from __future__ import annotations

import dataclasses
import io
import shutil
import struct
import zlib

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap import Captioner, ClipCapError
from clipcap import limits as L
from clipcap.decoding import DecodingOptions
from clipcap.images import TOO_LARGE, ImageLoadError, check_resize, open_image
from clipcap.serve import ServerLimits, create_app
from tests import tiny
from tests.hostile import clipcap, one_line_error


def strip_png(width: int, height: int) -> bytes:
    """A greyscale PNG of zeros from its header and one compressed stream: 600000x1 is under 2 KB."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def words(n: int) -> str:
    """A prompt of `n` tokens for the tiny tokenizer."""
    return " ".join(["a"] * n)


def png(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def files(*items):
    return [("image", (name, data, "image/png")) for name, data in items]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "red.png"
    path.write_bytes(png())
    return path


@pytest.fixture(scope="module")
def strips(tmp_path_factory):
    """A 600000x1 and a 1x600000 PNG (each under 2 KB) next to a good image."""
    folder = tmp_path_factory.mktemp("strips")
    for name, size in {"wide.png": (600_000, 1), "tall.png": (1, 600_000)}.items():
        (folder / name).write_bytes(strip_png(*size))
    (folder / "good.png").write_bytes(png())
    return folder


@pytest.fixture(scope="module")
def captioner(model_dir):
    return Captioner.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def exported(exported_dir):
    return Captioner.from_pretrained(exported_dir)


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory, tokenizer, clip_dir):
    """A model whose LM's context (24 positions) is shorter than prefix (4) + the default 67 new tokens."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=24, n_embd=32, n_layer=1, n_head=2)
    path = tmp_path_factory.mktemp("short-model")
    tiny.tiny_model("mlp", lm=GPT2LMHeadModel(config).eval(), stop_token_id=None).save_pretrained(path)
    tokenizer.save_pretrained(path)
    shutil.copytree(clip_dir, path / "clip")
    return path


# -- the real CLI ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--num-captions", "1000", "--do-sample"], "--num-captions must be at most 16, got 1000"),
        (["--num-captions", "99999999999999999999", "--do-sample"], "--num-captions must be at most 16"),
        (["--beams", "100"], "--beams must be at most 16, got 100"),
        (["--max-new-tokens", "1000000"], "--max-new-tokens must be at most 512, got 1000000"),
        (
            ["--max-new-tokens", "200"],
            "--max-new-tokens 200 does not fit the language model's context of 128 tokens after the prefix (4 tokens): "
            "at most 124",
        ),
        (["--prompt", words(60), "--max-new-tokens", "100"], "and the prompt (60): at most 64"),
        (["--prompt", "x" * 201], "--prompt must be at most 200 characters, got 201"),
        (["--do-sample", "--temperature", "1e-30"], "--temperature must be at least 0.01, got 1e-30"),
        (["--do-sample", "--repetition-penalty", "1e-30"], "--repetition-penalty must be at least 0.01"),
        (["--do-sample", "--top-p", "1.5"], "--top-p must be at most 1, got 1.5"),
        (["--batch-size", "1000000"], "--batch-size must be at most 1024, got 1000000"),
        (["--workers", "100000"], "--workers must be at most 64, got 100000"),
        (["--length-penalty", "0.5"], "--length-penalty only applies to beam search"),
        (["--length-penalty", "0.5", "--beams", "1"], "--length-penalty only applies to beam search"),
        (["--temperature", "0.5"], "--temperature only applies when sampling"),
        (["--top-k", "5"], "--top-k only applies when sampling"),
    ],
)
def test_caption_refuses_out_of_bounds_settings(args, fragment, model_dir, image):
    one_line_error(
        clipcap("caption", image, "--model", model_dir, "--quiet", *args), "clipcap caption: error:", fragment
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--prompt", "a picture of"], "an exported model cannot continue a prompt"),
        (["--max-new-tokens", "200"], "--max-new-tokens 200 does not fit the language model's context of 128"),
    ],
)
def test_caption_refuses_what_an_exported_model_cannot_do(args, fragment, exported_dir, image):
    one_line_error(clipcap("caption", image, "--model", exported_dir, "--quiet", *args), fragment)


def test_the_default_caption_length_is_cut_to_a_short_context(short_model_dir, image):
    done = clipcap("caption", image, "--model", short_model_dir, "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    one_line_error(
        clipcap("caption", image, "--model", short_model_dir, "--max-new-tokens", "67"),
        "--max-new-tokens 67 does not fit the language model's context of 24 tokens after the prefix (4 tokens): "
        "at most 20",
    )


def test_a_1xn_and_an_nx1_png_are_skipped_from_their_header(strips, model_dir):
    assert max(len((strips / n).read_bytes()) for n in ("wide.png", "tall.png")) < 2048
    done = clipcap("caption", strips, "--model", model_dir, "--quiet", "--workers", "0")
    assert done.returncode == 0, done.stderr
    assert [line.split('"image": ')[1].split(",")[0] for line in done.stdout.splitlines()] == [
        f'"{strips / "good.png"}"'
    ]
    lines = sorted(done.stderr.strip().splitlines())
    assert lines == [
        f"skipped {strips / 'tall.png'}: too elongated (1x600000: sides more than 100 to 1 apart)",
        f"skipped {strips / 'wide.png'}: too elongated (600000x1: sides more than 100 to 1 apart)",
    ]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--max-new-tokens", "200"], "--max-new-tokens 200 does not fit the language model's context of 128 tokens"),
        (["--beams", "100"], "--beams must be at most 16, got 100"),
        (["--batch-size", "5000"], "--batch-size must be at most 1024, got 5000"),
        (["--do-sample", "--temperature", "0"], "--temperature must be at least 0.01, got 0.0"),
    ],
)
def test_evaluate_refuses_before_reading_its_data(args, fragment, model_dir, tmp_path):
    # the data does not exist: the settings are refused first
    done = clipcap("evaluate", "--model", model_dir, "--data", tmp_path / "nope.json", "--quiet", *args)
    one_line_error(done, "clipcap evaluate: error:", fragment)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--batch-size", "1000000"], "--batch-size must be at most 1024, got 1000000"),
        (["--workers", "100000"], "--workers must be at most 64, got 100000"),
    ],
)
def test_embed_refuses_out_of_bounds_settings(args, fragment, strips, clip_dir, tmp_path):
    done = clipcap("embed", strips, "--out", tmp_path / "store", "--clip-model", clip_dir, "--quiet", *args)
    one_line_error(done, "clipcap embed: error:", fragment)
    assert not (tmp_path / "store").exists()


# -- the server's own settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["--max-tokens", "200"],
            "--max-tokens 200 does not fit the language model's context of 128 tokens after the prefix (4 tokens): "
            "at most 124",
        ),
        (["--max-tokens", "1000"], "--max-tokens must be at most 512, got 1000"),
        (["--max-new-tokens", "500"], "--max-new-tokens 500 does not fit the language model's context of 128"),
        (["--max-beams", "100"], "--max-beams must be at most 16, got 100"),
        (["--max-upload-mb", "1e9"], "--max-upload-mb must be at most 1024"),
        (["--timeout", "1e9"], "--timeout must be at most 3600"),
        (["--max-images", "100000"], "--max-images must be at most 256"),
        (["--max-batch-size", "100000"], "--max-batch-size must be at most 1024"),
        (["--max-queue", "10000000"], "--max-queue must be at most 100000"),
        (["--decode-workers", "1000000"], "--decode-workers must be at most 64"),
        (["--max-wait-ms", "1e12"], "--max-wait-ms must be at most 3.6e+06"),
        (["--max-pixels", "1000000000"], "--max-pixels must be at most 6.4e+07"),
        (["--do-sample", "--temperature", "1e-30"], "--temperature must be at least 0.01"),
        (["--length-penalty", "0.5"], "--length-penalty only applies to beam search"),
    ],
)
def test_serve_refuses_to_start_with_settings_that_fail_every_request(args, fragment, model_dir):
    one_line_error(clipcap("serve", "--model", model_dir, *args, timeout=120), "clipcap serve: error:", fragment)


def test_serve_refuses_a_default_prompt_for_an_exported_model(exported_dir):
    one_line_error(
        clipcap("serve", "--model", exported_dir, "--prompt", "a picture of", timeout=120),
        "clipcap serve: error: an exported model cannot continue a prompt",
    )


def test_create_app_checks_its_settings_against_the_model(captioner, exported):
    with pytest.raises(ClipCapError, match="`max_tokens` 125 does not fit .* at most 124"):
        create_app(captioner, ServerLimits(max_tokens=125))
    with pytest.raises(ClipCapError, match="an exported model cannot continue a prompt"):
        create_app(exported, ServerLimits(prompt="a picture of"))
    app = create_app(captioner, ServerLimits(max_tokens=124))  # exactly what the context leaves
    with TestClient(app) as c:
        assert c.get("/healthz").json()["limits"]["max_new_tokens"] == 124


# -- the HTTP API ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(captioner):
    with TestClient(create_app(captioner, ServerLimits(max_upload_mb=1))) as c:
        yield c


@pytest.mark.parametrize(
    "data, status, words",
    [
        ({"num_captions": 1000, "do_sample": "true"}, 422, "less than or equal to 16"),
        ({"num_captions": 10**30, "do_sample": "true"}, 422, "less than or equal to 16"),
        ({"num_beams": 100}, 422, "less than or equal to 8"),
        ({"max_new_tokens": 10**6}, 422, "less than or equal to 100"),
        ({"prompt": "x" * 201}, 422, "at most 200 characters"),
        ({"do_sample": "true", "temperature": 1e-30}, 422, "greater than or equal to 0.01"),
        ({"do_sample": "true", "top_p": 1.5}, 422, "less than or equal to 1"),
        ({"do_sample": "true", "repetition_penalty": 0}, 422, "greater than or equal to 0.01"),
        (
            {"prompt": words(60), "max_new_tokens": 100},
            400,
            "`max_new_tokens` 100 does not fit the language model's context of 128 tokens after the prefix (4 tokens) "
            "and the prompt (60): at most 64",
        ),
        ({"length_penalty": 0.5}, 400, "`length_penalty` only applies to beam search"),
    ],
)
def test_out_of_bounds_requests_are_4xx_before_any_upload_is_opened(client, data, status, words):
    r = client.post("/v1/captions", files=files(("a.png", b"not even an image")), data=data)
    assert r.status_code == status, r.text
    assert words in r.text
    assert client.get("/healthz").json()["status"] == "ok"


def test_a_long_prompt_with_the_default_length_is_cut_to_fit(client, captioner):
    prompt = words(100)  # 100 prompt tokens + 4 prefix: 24 of the context left, under the default 67
    r = client.post("/v1/captions", files=files(("a.png", png())), data={"prompt": prompt})
    assert r.status_code == 200, r.text
    expected = captioner.caption(Image.open(io.BytesIO(png())), prompt=prompt, max_new_tokens=24)
    assert r.json()["results"][0]["captions"] == expected


@pytest.mark.parametrize("size", [(600_000, 1), (1, 600_000)])
def test_a_tiny_strip_png_is_413_from_its_header(client, size):
    data = strip_png(*size)
    assert len(data) < 2048
    r = client.post("/v1/captions", files=files(("strip.png", data)))
    assert r.status_code == 413
    assert "too elongated" in r.json()["detail"]


def test_an_upload_past_the_limit_is_413(client):
    r = client.post("/v1/captions", files=files(("big.png", b"\x00" * (1024 * 1024 + 1))))
    assert (r.status_code, r.json()) == (413, {"detail": "request body over the limit of 1048576 bytes"})


def test_the_exported_server_refuses_a_prompt_per_request(exported):
    with TestClient(create_app(exported)) as c:
        r = c.post("/v1/captions", files=files(("a.png", png())), data={"prompt": "a picture of"})
        assert (r.status_code, r.json()) == (
            400,
            {"detail": "an exported model cannot continue a prompt: caption with the model dir it came from"},
        )
        assert c.post("/v1/captions", files=files(("a.png", png()))).status_code == 200


def test_form_bounds_are_the_decoding_options_bounds(captioner):
    app = create_app(captioner, ServerLimits(max_beams=L.MAX_BEAMS))
    schema = app.openapi()["components"]["schemas"]
    (form,) = [s for name, s in schema.items() if name.startswith("Body_captions")]
    props = form["properties"]

    def bounds(name):
        prop = next(p for p in props[name].get("anyOf", [props[name]]) if p.get("type") != "null")
        return prop.get("minimum"), prop.get("maximum"), prop.get("maxLength")

    meta = {f.name: f.metadata for f in dataclasses.fields(DecodingOptions)}
    for name in ("num_beams", "temperature", "top_p", "top_k", "repetition_penalty"):
        assert bounds(name)[:2] == (meta[name]["min"], meta[name]["max"]), name
    assert bounds("prompt")[2] == L.MAX_PROMPT_CHARS
    assert bounds("num_captions")[:2] == (1, L.MAX_CAPTIONS)


# -- the Python API ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_return_sequences": 1000, "do_sample": True}, "`num_return_sequences` must be at most 16, got 1000"),
        ({"num_beams": 100}, "`num_beams` must be at most 16, got 100"),
        ({"num_beams": 0}, "`num_beams` must be at least 1, got 0"),
        ({"max_new_tokens": 10**9}, "`max_new_tokens` must be at most 512"),
        ({"max_new_tokens": 125}, "`max_new_tokens` 125 does not fit the language model's context of 128 tokens"),
        ({"prompt": "a " * 130}, "`prompt` must be at most 200 characters, got 260"),
        ({"prompt": words(100), "max_new_tokens": 30}, "and the prompt (100): at most 24"),
        ({"do_sample": True, "temperature": 1e-30}, "`temperature` must be at least 0.01, got 1e-30"),
        ({"do_sample": True, "top_p": 1.5}, "`top_p` must be at most 1, got 1.5"),
        ({"repetition_penalty": 1e-45}, "`repetition_penalty` must be at least 0.01, got 1e-45"),
        ({"temperature": 0.5}, "`temperature` only applies when sampling"),
        ({"length_penalty": 0.5}, "`length_penalty` only applies to beam search"),
        ({"num_return_sequences": 3}, "3 captions per image need at least 3 beams or sampling"),
    ],
)
def test_caption_refuses_before_opening_any_image(captioner, kwargs, message, tmp_path):
    # the image does not exist: the settings are refused before it would be looked for
    with pytest.raises(ClipCapError, match=None) as info:
        captioner.caption(tmp_path / "missing.png", **kwargs)
    assert message in str(info.value)
    assert not isinstance(info.value, ImageLoadError)


def test_exported_models_are_bounded_by_their_context_too(exported):
    embeds = torch.randn(1, exported.model.config.clip_dim)
    with pytest.raises(ClipCapError, match="`max_new_tokens` 125 does not fit .* context of 128 tokens"):
        exported.caption_embeddings(embeds, max_new_tokens=125)
    with pytest.raises(ClipCapError, match="cannot continue a prompt"):
        exported.caption_embeddings(embeds, prompt="a picture of")
    assert len(exported.caption_embeddings(embeds, max_new_tokens=124)) == 1  # the largest that fits works


def test_the_model_itself_refuses_past_its_context(captioner):
    # below Captioner: the backstop in generation.py, for callers of the model (and the pipeline) directly
    with pytest.raises(ClipCapError, match="`temperature` must be at least 0.01, got 1e-45"):
        captioner.model.generate(torch.randn(1, 16), do_sample=True, temperature=1e-45)  # was a NaN crash
    with pytest.raises(ClipCapError, match="after the prefix \\(4 tokens\\): at most 124"):
        captioner.model.generate(torch.randn(1, 16), max_new_tokens=125)
    prompt = torch.ones(1, 30, dtype=torch.long)
    with pytest.raises(ClipCapError, match="after the prefix \\(34 tokens\\): at most 94"):
        captioner.model.generate(torch.randn(1, 16), max_new_tokens=95, input_ids=prompt)
    assert captioner.model.generate(torch.randn(1, 16), max_new_tokens=94, input_ids=prompt, stop_token_id=None).shape


def test_the_default_length_is_cut_for_a_short_context(short_model_dir):
    short = Captioner.from_pretrained(short_model_dir)
    assert short.decoding()["max_new_tokens"] == 20  # 24 positions - 4 prefix, not the default 67
    assert len(short.caption_embeddings(torch.randn(1, 16))) == 1
    ids = short.model.generate(torch.randn(1, 16), **short.decoding())
    assert ids.shape == (1, 20)  # stop_token_id is None: every token the context leaves is generated
    with pytest.raises(ClipCapError, match="at most 20"):
        short.caption_embeddings(torch.randn(1, 16), max_new_tokens=21)
    with pytest.raises(ClipCapError, match="leave no room for a caption in the language model's context of 24"):
        short.caption_embeddings(torch.randn(1, 16), prompt="a " * 20)


def test_batch_size_is_bounded(model_dir):
    with pytest.raises(ClipCapError, match="`batch_size` must be at most 1024, got 1000000"):
        Captioner.from_pretrained(model_dir, batch_size=10**6)


@pytest.mark.parametrize("size", [(600_000, 1), (1, 600_000), (101, 1), (1, 101)])
def test_elongated_images_are_refused_from_the_header(size, captioner):
    data = strip_png(*size)
    with pytest.raises(ImageLoadError, match="too elongated") as info:
        captioner.caption(Image.open(io.BytesIO(data)))
    assert info.value.kind == TOO_LARGE
    assert open_image(strip_png(100, 1)).size == (100, 1)  # exactly 100:1 is allowed


def test_the_resize_is_checked_before_the_processor_runs(captioner):
    image = Image.new("RGB", (1000, 90))  # 11:1, within the aspect bound
    big = type("Processor", (), {"size": {"shortest_edge": 2000}, "do_resize": True})()
    with pytest.raises(ImageLoadError, match="resized for the encoder, 1000x90 would be 22222x2000") as info:
        check_resize([image], big, ["wide.jpg"])
    assert (info.value.source, info.value.kind) == ("wide.jpg", TOO_LARGE)
    check_resize([image], captioner.encoder.processor)  # the tiny CLIP's 32-pixel resize: 355x32 is fine


@pytest.mark.parametrize(
    "size, width, height, out",
    [
        ({"shortest_edge": 224}, 600, 300, (448, 224)),
        ({"shortest_edge": 224}, 300, 600, (224, 448)),
        ({"shortest_edge": 224, "longest_edge": 300}, 600, 300, (300, 150)),
        ({"height": 384, "width": 384}, 6000, 1, (384, 384)),
        ({"longest_edge": 512}, 1000, 250, (512, 128)),
        (224, 5, 7, (224, 224)),
        ({"unknown": 3}, 5, 7, None),
        (None, 5, 7, None),
    ],
)
def test_resized_size_follows_the_processor_settings(size, width, height, out):
    assert L.resized_size(size, width, height) == out


# -- any integers ------------------------------------------------------------------------------------------------
ANY_INT = st.one_of(st.integers(-3, 20), st.integers(-(10**30), 10**30), st.sampled_from([124, 125, 512, 513]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(beams=ANY_INT, captions=ANY_INT, tokens=ANY_INT, prompt_words=st.integers(0, 120), sample=st.booleans())
def test_any_integers_are_refused_or_generate(captioner, beams, captions, tokens, prompt_words, sample):
    kwargs = dict(
        num_beams=beams,
        num_return_sequences=captions,
        max_new_tokens=tokens,
        do_sample=sample,
        prompt=words(prompt_words) or None,
    )
    try:
        settings_ = captioner.decoding(None, captions, beams, tokens, do_sample=sample, prompt=kwargs["prompt"])
    except ClipCapError:
        return  # refused up front, with one error
    assert 1 <= beams <= L.MAX_BEAMS and 1 <= captions <= L.MAX_CAPTIONS and 1 <= tokens <= L.MAX_NEW_TOKENS
    assert 4 + len(captioner._prompt_ids(kwargs["prompt"])) + settings_["max_new_tokens"] <= 128
    out = captioner.caption_embeddings(torch.randn(1, 16), **kwargs)
    assert len(out) == 1 and (captions == 1 or len(out[0]) == captions)


def test_the_pipeline_processor_checks_the_resize_too(captioner):
    from clipcap.processing import ClipCapProcessor

    image_processor = type(captioner.encoder.processor).from_dict(
        {**captioner.encoder.processor.to_dict(), "size": {"shortest_edge": 2000}}
    )
    processor = ClipCapProcessor(image_processor, captioner.tokenizer)
    with pytest.raises(ImageLoadError, match="resized for the encoder, 1000x90 would be 22222x2000"):
        processor(images=[Image.new("RGB", (1000, 90))])
    assert processor(images=[Image.new("RGB", (90, 90))])["pixel_values"].shape[-1] == 32  # its crop size


def test_batch_times_beams_is_decoded_in_runs_of_bounded_sequences(captioner, monkeypatch):
    embeds = torch.randn(5, 16)
    whole = captioner.caption_embeddings(embeds, num_beams=4, num_return_sequences=2, max_new_tokens=5)
    monkeypatch.setattr(L, "MAX_SEQUENCES", 8)
    sequences, generate = [], captioner.model.generate

    def counting(chunk, **kwargs):
        sequences.append(len(chunk) * max(kwargs["num_beams"], kwargs["num_return_sequences"]))
        return generate(chunk, **kwargs)

    monkeypatch.setattr(captioner.model, "generate", counting)
    split = captioner.caption_embeddings(embeds, num_beams=4, num_return_sequences=2, max_new_tokens=5)
    assert sequences == [8, 8, 4]  # 2 + 2 + 1 images at 4 beams
    assert split == whole
