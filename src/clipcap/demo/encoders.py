"""The shapes world's small "pretrained" encoders, made by the project: they stand in for CLIP and GPT-2 offline.

Like the web-scale pretraining of the real CLIP and GPT-2, they learn from the *whole* world (a seeded stream of
scenes drawn exactly as the `pretrain` split is, novel compositions included, docs/design.md §7); ClipCap's own training
pairs are what keep novel compositions out. Three ordinary HF directories come out, so `--clip-model DIR` and
`--lm DIR` use the real loading code:

    clip/   a tiny CLIPModel (ViT, patch 8 on 40-px images) trained contrastively, + image processor + tokenizer
    lm/     a tiny GPT-2 pretrained as a language model on packed "documents" (several captions of one scene),
            + the byte-level BPE tokenizer trained with HF `tokenizers`

The shipped copies live in `clipcap/assets/shapes/`; `build_encoders()` (`clipcap demo --rebuild-encoders`) remakes
them. `probe_clip` checks the ceiling they set: a linear probe of shape/colour trained on familiar images only and
tested on novel ones.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import world as shapes

ASSETS = Path(__file__).parent / "assets" / "shapes"
EOS = "<|endoftext|>"


@dataclass
class EncoderRecipe:
    """Everything that determines the shipped encoders (recorded in recipe.json next to them)."""

    seed: int = 0
    image_size: int = 40
    vocab_size: int = 400
    tokenizer_texts: int = 20000
    # CLIP
    clip_patch: int = 8
    clip_hidden: int = 128
    clip_layers: int = 4
    clip_text_layers: int = 3
    clip_projection: int = 128
    clip_steps: int = 4000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_partial: float = 0.5  # share of captions that name only some attributes (so each is readable alone)
    clip_hard_negatives: bool = True  # a swapped-binding caption per two-object scene
    clip_attribute_negatives: bool = True  # a caption with one attribute of one object changed, per scene
    # NegCLIP (Yuksekgonul et al. 2023) for where things are: after `clip_steps`, fine-tune for this many steps
    # with, per two-object scene, the scene with its objects' places swapped as another image of the batch (with its
    # own caption: a hard negative image for the text side, a hard negative caption for the image side), and per
    # single object a caption placing it elsewhere. 0: no such stage.
    clip_relation_steps: int = 0
    clip_relation_lr: float = 3e-4
    # LM
    lm_hidden: int = 160
    lm_layers: int = 4
    lm_heads: int = 5
    lm_context: int = 128
    lm_steps: int = 800
    lm_batch: int = 16
    lm_lr: float = 2e-3
    warmup: float = 0.05  # fraction of steps
    probe_images: int = 3000
    extra: dict = field(default_factory=dict)


def scene_stream(seed: int, image_size: int) -> Iterator[tuple[shapes.Scene, np.random.Generator]]:
    """An endless, seeded stream of whole-world scenes (the `pretrain` distribution)."""
    rng = np.random.default_rng([seed, 7919])
    while True:
        yield shapes.sample_scene(rng, image_size, novel=None), rng


def _lr_lambda(steps: int, warmup: float) -> Callable[[int], float]:
    warm = max(1, int(steps * warmup))
    return lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))


# -- tokenizer -----------------------------------------------------------------------------------------------------
def train_tokenizer(recipe: EncoderRecipe):
    """Byte-level BPE (GPT-2 style) trained on whole-world captions; eos doubles as pad and bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stream = scene_stream(recipe.seed + 1, recipe.image_size)
    texts = []
    for _ in range(recipe.tokenizer_texts):
        scene, rng = next(stream)
        texts.extend(shapes.captions(scene, rng, 2))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["\n".join(texts[i : i + 5]) for i in range(0, len(texts), 5)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def _clip_tokenizer(tokenizer):
    """The LM tokenizer plus an eos after every text: CLIP's text tower pools at the first eos."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    eos_id = tokenizer.eos_token_id
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS, bos_token=EOS)


# -- CLIP ----------------------------------------------------------------------------------------------------------
def _partial_caption(scene: shapes.Scene, rng: np.random.Generator) -> str:
    """A caption that names only some attributes ("a purple shape.", "a triangle and a red circle."), so that
    shape and colour must each be readable from the image embedding on their own."""
    parts = []
    for obj in scene.objects:
        size, colour, shape = rng.random() < 0.5, rng.random() < 0.6, rng.random() < 0.6
        if not (colour or shape):
            colour, shape = (True, False) if rng.random() < 0.5 else (False, True)
        words = [obj.size] * size + [obj.colour] * colour + [obj.shape if shape else "shape"]
        parts.append("a " + " ".join(words))
    return shapes._with_article(" and ".join(parts) + ".")


def _hard_negative(scene: shapes.Scene, rng: np.random.Generator) -> str | None:
    """A caption of a two-object scene with its attributes bound the other way (colours or shapes swapped between
    the objects): the same bag of words, a different picture. None for one object, or when a swap changes nothing.

    Random batches almost never hold such a pair, so without them CLIP learns bags of words (its known binding
    weakness) and "a red circle left of a green triangle" embeds like "a green circle left of a red triangle"."""
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects
    swaps = [f for f in ("colour", "shape") if getattr(a, f) != getattr(b, f)]
    if not swaps:
        return None
    f = swaps[rng.integers(len(swaps))]
    swapped = (replace(a, **{f: getattr(b, f)}), replace(b, **{f: getattr(a, f)}))
    return shapes.captions(replace(scene, objects=swapped), rng, 1)[0]


def _attribute_negative(scene: shapes.Scene, rng: np.random.Generator) -> str:
    """A caption of the scene with one attribute (colour, shape or size) of one object changed to another value:
    one word away from the truth, so the image embedding must carry every attribute of every object exactly."""
    i = int(rng.integers(len(scene.objects)))
    field_, values = (("colour", list(shapes.COLOURS)), ("shape", list(shapes.SHAPES)), ("size", list(shapes.SIZES)))[
        int(rng.integers(3))
    ]
    obj = scene.objects[i]
    others = [v for v in values if v != getattr(obj, field_)]
    objects = list(scene.objects)
    objects[i] = replace(obj, **{field_: others[int(rng.integers(len(others)))]})
    return shapes.captions(replace(scene, objects=tuple(objects)), rng, 1)[0]


def swap_places(scene: shapes.Scene, image_size: int) -> shapes.Scene | None:
    """The scene with its two objects' places swapped (each keeps its size, centred where the other was; the
    relation becomes its inverse), or None for one object or when the swapped objects would overlap."""
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects

    def moved(obj: shapes.Shape, to: shapes.Shape) -> shapes.Shape:
        centre = ((to.box[0] + to.box[2]) / 2, (to.box[1] + to.box[3]) / 2)
        return replace(obj, box=shapes._box(centre, obj.box[2] - obj.box[0], image_size))

    objects = (moved(a, b), moved(b, a))
    if shapes._overlap(objects[0].box, objects[1].box):
        return None
    return replace(scene, objects=objects, layout=shapes.RELATIONS[scene.layout][2])


def _relation_negative(scene: shapes.Scene, rng: np.random.Generator) -> str:
    """A caption of the scene with its objects' places swapped: the relation flipped for two objects, another
    position for one. The same words but one (or the relation phrase), so the embedding must say where things are."""
    if len(scene.objects) == 2:
        moved = replace(scene, layout=shapes.RELATIONS[scene.layout][2])
    else:
        others = [p for p in shapes.POSITIONS if p != scene.layout]
        moved = replace(scene, layout=others[int(rng.integers(len(others)))])
    return shapes.captions(moved, rng, 1)[0]


def _clip_batch(stream, recipe: EncoderRecipe, processor, tokenizer, rng: np.random.Generator, relations: bool):
    """One batch: images and their captions (with `relations`, swapped-place images and their captions), then
    hard-negative captions (texts with no image of their own)."""
    images, texts, negatives = [], [], []
    for _ in range(recipe.clip_batch):
        scene, scene_rng = next(stream)
        images.append(shapes.render(scene, recipe.image_size, scene_rng))
        if rng.random() < recipe.clip_partial:
            texts.append(_partial_caption(scene, rng))
        else:
            texts.append(shapes.captions(scene, scene_rng, 1)[0])
        if recipe.clip_hard_negatives:
            negatives.append(_hard_negative(scene, rng))
        if recipe.clip_attribute_negatives:
            negatives.append(_attribute_negative(scene, rng))
        swapped = swap_places(scene, recipe.image_size) if relations else None
        if swapped is not None:
            # Its caption is the relation negative of this scene, with an image of its own: as a negative text only
            # it would be wrongly scored against the swapped image.
            images.append(shapes.render(swapped, recipe.image_size, rng))
            texts.append(shapes.captions(swapped, rng, 1)[0])
        elif relations:
            negatives.append(_relation_negative(scene, rng))
    texts += [t for t in negatives if t is not None]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    return pixels, tokens, texts


def _soft_clip_loss(logits_per_image: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Symmetric CLIP loss where every identical text counts as a positive (small worlds repeat captions).

    Texts beyond the first len(images) are extra negatives: only the image -> text direction sees them."""
    n = logits_per_image.shape[0]
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    key = torch.tensor([ids[t] for t in texts])
    target = (key[:n, None] == key[None, :]).float()
    image_loss = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits_per_image, dim=1)).sum(1).mean()
    square = target[:, :n]
    text_loss = -(square / square.sum(1, keepdim=True) * F.log_softmax(logits_per_image[:, :n].t(), dim=1)).sum(1)
    return (image_loss + text_loss.mean()) / 2


def build_clip(recipe: EncoderRecipe, vocab_size: int, eos_id: int):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(recipe.seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=recipe.clip_hidden,
            intermediate_size=recipe.clip_hidden * 2,
            num_hidden_layers=recipe.clip_text_layers,
            num_attention_heads=4,
            max_position_embeddings=48,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        ),
        vision_config=dict(
            hidden_size=recipe.clip_hidden,
            intermediate_size=recipe.clip_hidden * 2,
            num_hidden_layers=recipe.clip_layers,
            num_attention_heads=4,
            image_size=recipe.image_size,
            patch_size=recipe.clip_patch,
        ),
        projection_dim=recipe.clip_projection,
    )
    return CLIPModel(config)


def _clip_stage(model, recipe: EncoderRecipe, processor, clip_tok, stage: str, log: Callable[[str], None]) -> None:
    """One contrastive training stage of the tiny CLIP: `base` (clip_steps) or `relations` (NegCLIP fine-tuning,
    clip_relation_steps), each with its own seeded scene stream, optimizer and warm-up + cosine schedule."""
    relations = stage == "relations"
    steps, lr = (
        (recipe.clip_relation_steps, recipe.clip_relation_lr) if relations else (recipe.clip_steps, recipe.clip_lr)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, recipe.warmup))
    stream = scene_stream(recipe.seed + 3 if relations else recipe.seed, recipe.image_size)
    rng = np.random.default_rng([recipe.seed, 37 if relations else 31])
    model.train()
    start = time.time()
    bar = tqdm(range(steps), desc=f"pretrain CLIP ({stage})", unit="step")
    for step in bar:
        pixels, tokens, texts = _clip_batch(stream, recipe, processor, clip_tok, rng, relations)
        out_ = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        loss = _soft_clip_loss(out_.logits_per_image, texts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 200 == 0 or step == steps - 1:
            log(f"clip {stage} step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    model.eval()


def train_clip(recipe: EncoderRecipe, tokenizer, out: Path, log: Callable[[str], None] = print) -> Path:
    """Train the tiny CLIP contrastively on a stream of whole-world scenes, then (clip_relation_steps > 0) fine-tune
    it NegCLIP-style on where things are; save model + processor + tokenizer."""
    from transformers import CLIPImageProcessorPil

    size = recipe.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    clip_tok = _clip_tokenizer(tokenizer)
    model = build_clip(recipe, len(tokenizer), tokenizer.eos_token_id)
    _clip_stage(model, recipe, processor, clip_tok, "base", log)
    if recipe.clip_relation_steps:
        _clip_stage(model, recipe, processor, clip_tok, "relations", log)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    clip_tok.save_pretrained(out)
    return out


# -- LM ------------------------------------------------------------------------------------------------------------
def document_stream(seed: int, image_size: int, tokenizer) -> Iterator[int]:
    """Token ids of packed documents: each document is 2-5 captions of one scene, each caption ended by eos (the
    end token ClipCap's training appends).

    Real LMs learn from documents that stay on a topic; here that teaches the LM to continue a description
    consistently with what came before it, which is what a prefix needs to steer."""
    for scene, rng in scene_stream(seed, image_size):
        for ids in tokenizer(shapes.captions(scene, rng, int(rng.integers(2, 6))))["input_ids"]:
            yield from ids
            yield tokenizer.eos_token_id


def build_lm(recipe: EncoderRecipe, vocab_size: int, eos_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(recipe.seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max(recipe.lm_context, 256),
        n_embd=recipe.lm_hidden,
        n_layer=recipe.lm_layers,
        n_head=recipe.lm_heads,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


def train_lm(recipe: EncoderRecipe, tokenizer, out: Path, log: Callable[[str], None] = print) -> Path:
    """Pretrain the tiny GPT-2 on packed whole-world documents (every position of every window trained)."""
    model = build_lm(recipe, len(tokenizer), tokenizer.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lm_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.lm_steps, recipe.warmup))
    stream = document_stream(recipe.seed + 2, recipe.image_size, tokenizer)
    window = recipe.lm_batch * recipe.lm_context
    model.train()
    start = time.time()
    bar = tqdm(range(recipe.lm_steps), desc="pretrain LM", unit="step")
    for step in bar:
        ids = torch.tensor([next(stream) for _ in range(window)]).view(recipe.lm_batch, recipe.lm_context)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 200 == 0 or step == recipe.lm_steps - 1:
            log(f"lm step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    model.eval()
    # Dropout served pretraining; the demo's one-epoch fine-tuning of a tuned LM learns faster without it (test
    # objects 0.753 vs 0.722 at equal steps), so the saved config turns it off (a frozen LM runs in eval mode anyway).
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# -- checks --------------------------------------------------------------------------------------------------------
def _fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def relation_retrieval(encoder, rng: np.random.Generator, count: int, novel: bool, image_size: int = 40) -> float:
    """Fraction of two-object images closer to "a A <relation> a B." than to the same caption with the relation
    flipped (0.5 = chance: a bag of words). Both captions name the objects in the same order and the same way."""
    scenes = []
    while len(scenes) < count:
        scene = shapes.sample_scene(rng, image_size, novel=novel)
        if len(scene.objects) == 2:
            scenes.append(scene)
    images = F.normalize(encoder.encode([shapes.render(s, image_size, rng) for s in scenes], batch_size=256), dim=-1)

    def caption(scene: shapes.Scene, relation: str) -> str:
        a, b = (shapes._phrase(o, True) for o in scene.objects)
        return shapes._with_article(f"a {a} {shapes.RELATION_WORDS[relation]} a {b}.")

    true = F.normalize(encoder.encode_text([caption(s, s.layout) for s in scenes]), dim=-1)
    flipped = F.normalize(encoder.encode_text([caption(s, shapes.RELATIONS[s.layout][2]) for s in scenes]), dim=-1)
    return ((images * true).sum(-1) > (images * flipped).sum(-1)).float().mean().item()


def probe_clip(clip_dir: str | Path, n: int = 3000, seed: int = 123, image_size: int = 40) -> dict[str, float]:
    """Linear probes of shape and colour on single-object image embeddings: fit on familiar compositions only,
    score on held-out familiar images and on novel ones (purple triangle / yellow square); and `relation_retrieval`
    on two-object images of both kinds."""
    from ..encoder import ImageEncoder

    encoder = ImageEncoder.from_pretrained(str(clip_dir))
    rng = np.random.default_rng(seed)
    result = {}

    def draw(novel: bool, count: int):
        scenes = []
        while len(scenes) < count:
            scene = shapes.sample_scene(rng, image_size, novel=novel)
            if len(scene.objects) == 1:
                scenes.append(scene)
        feats = encoder.encode([shapes.render(s, image_size, rng) for s in scenes], batch_size=256)
        shape_y = torch.tensor([shapes.SHAPES.index(s.objects[0].shape) for s in scenes])
        colour_y = torch.tensor([list(shapes.COLOURS).index(s.objects[0].colour) for s in scenes])
        return F.normalize(feats, dim=-1), shape_y, colour_y

    train_x, train_s, train_c = draw(False, n)
    test_x, test_s, test_c = draw(False, n // 3)
    novel_x, novel_s, novel_c = draw(True, n // 3)
    for name, train_y, test_y, novel_y, k in (
        ("shape", train_s, test_s, novel_s, len(shapes.SHAPES)),
        ("colour", train_c, test_c, novel_c, len(shapes.COLOURS)),
    ):
        probe = _fit_probe(train_x, train_y, k)
        with torch.no_grad():
            result[f"{name}_in_domain"] = (probe(test_x).argmax(1) == test_y).float().mean().item()
            result[f"{name}_novel"] = (probe(novel_x).argmax(1) == novel_y).float().mean().item()
    for novel in (False, True):  # ARO-style: does the image prefer its caption to the relation-flipped one?
        result[f"relation_{'novel' if novel else 'in_domain'}"] = relation_retrieval(encoder, rng, n // 3, novel)
    return result


def build_encoders(
    out: str | Path = ASSETS,
    recipe: EncoderRecipe | None = None,
    parts: tuple[str, ...] = ("clip", "lm"),
    threads: int | None = None,
) -> Path:
    """Make the tokenizer, then the parts asked for (`clip`, `lm`), under `out`; write recipe.json and the probe."""
    recipe = recipe or EncoderRecipe()
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(recipe)
    report: dict = {"recipe": asdict(recipe)}
    if "lm" in parts:
        start = time.time()
        train_lm(recipe, tokenizer, out / "lm")
        report["lm_seconds"] = round(time.time() - start, 1)
    if "clip" in parts:
        start = time.time()
        train_clip(recipe, tokenizer, out / "clip")
        report["clip_seconds"] = round(time.time() - start, 1)
        report["clip_probe"] = probe_clip(out / "clip", n=recipe.probe_images, image_size=recipe.image_size)
        print(f"CLIP linear probe: {report['clip_probe']}", flush=True)
    (out / "recipe.json").write_text(json.dumps(report, indent=2) + "\n")
    return out
