"""ImageEncoder: batched features equal one-by-one and a reference computation, normalisation, dtype, SigLIP, load
errors, tokenizer detection, and encoder fingerprints."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipcap import ClipCapError
from clipcap.encoder import ImageEncoder, fingerprint, same_encoder
from clipcap.images import ImageLoadError, open_image
from tests import tiny
from tests.test_images import noise_image


# -- ImageEncoder ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    paths = []
    for i in range(5):
        paths.append(folder / f"{i}.png")
        noise_image(40 + 3 * i, 30 + 5 * i, seed=i).save(paths[-1])
    return paths


def test_encoder_batched_equals_one_by_one_and_reference(clip_dir, images):
    enc = ImageEncoder.from_pretrained(clip_dir)
    assert enc.dim == 16 and enc.name == str(clip_dir) and enc.dtype == torch.float32
    mixed = [images[0], Image.open(images[1]), *images[2:]]  # paths and PIL images
    batched = enc.encode(mixed, batch_size=2)
    assert batched.shape == (5, 16) and batched.dtype == torch.float32
    one_by_one = torch.cat([enc.encode([p]) for p in images])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)
    pixel_values = enc.processor(images=[open_image(p) for p in images], return_tensors="pt")["pixel_values"]
    reference = enc.model.get_image_features(pixel_values=pixel_values).pooler_output
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-6)
    assert enc.encode([]).shape == (0, 16)


def test_encoder_normalize_flag(clip_dir, images):
    raw = ImageEncoder.from_pretrained(clip_dir).encode(images)
    unit = ImageEncoder.from_pretrained(clip_dir, normalize=True).encode(images)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(unit, F.normalize(raw, dim=-1))
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(5))


def test_encoder_dtype_aware(clip_dir, images):
    enc = ImageEncoder.from_pretrained(clip_dir, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    out = enc.encode(images)
    assert out.dtype == torch.float32  # features leave in float32 whatever the compute dtype
    torch.testing.assert_close(out, ImageEncoder.from_pretrained(clip_dir).encode(images), rtol=0.1, atol=0.05)


def test_encoder_bad_image_raises_image_load_error(clip_dir, images, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        ImageEncoder.from_pretrained(clip_dir).encode([images[0], tmp_path / "bad.jpg"])


def test_encoder_siglip(tmp_path, images):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    SiglipModel(config).save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = ImageEncoder.from_pretrained(tmp_path, normalize=True)
    assert enc.dim == 24  # no projection: the vision tower's width
    out = enc.encode(images, batch_size=3)
    assert out.shape == (5, 24)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    pixels = enc.preprocess([open_image(p) for p in images])
    pooled, tokens = enc.encode_pixels_and_tokens(pixels)
    torch.testing.assert_close(pooled, out)
    assert enc.token_dim == 24 and tokens.shape == (5, 16, 24)  # 4 x 4 patches, no class token
    _, grid = enc.encode_pixels_and_tokens(pixels, grid=2)
    torch.testing.assert_close(grid[:, 0], tokens.view(5, 4, 4, 24)[:, :2, :2].mean(dim=(1, 2)))


def test_encoder_tokens_are_the_vision_towers_last_hidden_states(clip_dir, images):
    enc = ImageEncoder.from_pretrained(clip_dir)
    pixels = enc.preprocess([open_image(p) for p in images])
    pooled, tokens = enc.encode_pixels_and_tokens(pixels)
    torch.testing.assert_close(pooled, enc.encode_pixels(pixels))
    reference = enc.model.vision_model(pixel_values=pixels).last_hidden_state
    assert enc.token_dim == 32 and tokens.shape == (5, 17, 32)  # class token + 4 x 4 patches of 8 px on 32 px
    torch.testing.assert_close(tokens, reference)
    _, pooled_grid = enc.encode_pixels_and_tokens(pixels, grid=2)
    assert pooled_grid.shape == (5, 5, 32)
    torch.testing.assert_close(pooled_grid[:, 0], reference[:, 0])  # the class token is kept as it is
    torch.testing.assert_close(pooled_grid[:, 4], reference[:, 1:].view(5, 4, 4, 32)[:, 2:, 2:].mean(dim=(1, 2)))


def test_encoder_load_errors(lm_dir, tmp_path):
    with pytest.raises(ClipCapError, match="cannot load a CLIP-family encoder"):
        ImageEncoder.from_pretrained(lm_dir)  # a language model dir: no image processor
    with pytest.raises(ClipCapError, match=r"'someone/my-clip'.*pass its local directory instead"):
        ImageEncoder.from_pretrained("someone/my-clip")


def test_encoder_rejects_a_model_without_image_features(tmp_path, lm_dir):
    from transformers import CLIPImageProcessorPil

    gpt2 = tiny.load_lm(lm_dir)
    gpt2.save_pretrained(tmp_path)
    CLIPImageProcessorPil().save_pretrained(tmp_path)
    with pytest.raises(ClipCapError, match="not a CLIP-family model"):
        ImageEncoder.from_pretrained(tmp_path)


def test_encoder_without_tokenizer_files_has_no_tokenizer(tmp_path, clip_dir):

    image_only = tmp_path / "clip-image-only"
    image_only.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(clip_dir / name, image_only / name)
    encoder = ImageEncoder.from_pretrained(image_only)
    assert encoder.tokenizer is None
    with pytest.raises(ClipCapError, match="has no tokenizer files"):
        encoder.encode_text(["a red circle."])
    assert ImageEncoder.from_pretrained(clip_dir).encode_text(["a red circle."]).shape == (1, 16)


def test_fingerprint_recognises_a_copied_encoder_and_tells_others_apart(tmp_path, clip_dir, tokenizer):
    copy = shutil.copytree(clip_dir, tmp_path / "copy")
    other = tiny.save_clip_dir(tmp_path / "other", tiny.tiny_clip(len(tokenizer), seed=1), tokenizer)
    assert fingerprint(str(clip_dir)) == fingerprint(str(copy)) is not None
    assert fingerprint(str(other)) != fingerprint(str(clip_dir))
    assert fingerprint("openai/clip-vit-base-patch32") is None  # not a local dir: no content to hash
    assert same_encoder(str(clip_dir), str(copy)) and not same_encoder(str(clip_dir), str(other))
    assert same_encoder("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32")
    assert not same_encoder("openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14")
    # a store made elsewhere records the fingerprint: the recorded path need not exist here
    assert same_encoder("/elsewhere/clip", str(copy), recorded_fingerprint=fingerprint(str(clip_dir)))
