"""Every bound on a count, length or size a user controls, in one place, and the checks that apply them.

The option dataclasses (`DecodingOptions`, the caption job, the server's settings), the server's form fields,
`Captioner` and the decoding backstop in `generation.py` all take their bounds from here, so a value the command line
accepts is one the HTTP API and the Python API accept, and each is checked before any work starts: one `ClipCapError`
names the value and the bound. A default never fails: a default caption length longer than what the LM's context
leaves is cut to fit (`fit_new_tokens`); a value the user gave that does not fit is refused.
"""

from __future__ import annotations

from .errors import ClipCapError

# -- decoding ---------------------------------------------------------------------------------------------------
# Each caption is one sequence held (with its key/value cache) for the whole decode: captions per image multiply a
# batch's memory. 16 is 3x the paper's beam width and more than any caption list a person reads; one unbounded HTTP
# request once grew the server to 23 GB.
MAX_CAPTIONS = 16
# Beam search holds `num_beams` sequences per image; captions stop improving by beam 5 (the paper's) and 16 is already
# more than published captioners use.
MAX_BEAMS = 16
# Candidate captions scored to pick one (reranking): bounded for the same reason as MAX_CAPTIONS.
MAX_CANDIDATES = 64  # candidate captions per image (beams or samples), reranked: 32 samples measurably beat 8
# The original implementation's caption length limit is 67 tokens and COCO captions average about 12; 512 leaves room
# for long descriptions while bounding the decode for an LM whose context is huge (the context bound applies too).
MAX_NEW_TOKENS = 512
# A prompt is the start of a caption ("a picture of"), not a document; characters are bounded before tokenizing, the
# tokens then against the LM's context with the prefix and the new tokens.
MAX_PROMPT_CHARS = 200
# Below 0.01 sampling is greedy decoding in all but name, and scores divided by a tiny temperature overflow to inf,
# which makes the sampling probabilities NaN: a crash inside `generate` (at 1e-45 with the tests' tiny GPT-2).
MIN_TEMPERATURE = 0.01
# Dividing (or multiplying) scores by a penalty near 0 overflows in the same way; 0.01 already inverts preferences.
MIN_REPETITION_PENALTY = 0.01
# top_p is a probability mass.
MAX_TOP_P = 1.0

# -- batches and images ---------------------------------------------------------------------------------------------
# Images (or stored embeddings) preprocessed and decoded together: 1024 224x224 images are 600 MB of pixels, and each
# is then multiplied by its beams or captions in the decode.
MAX_BATCH_SIZE = 1024
# Sequences decoded in one `generate` run: images x max(beams, captions per image), each with its key/value cache.
# A larger batch is decoded in several runs (the captions are the same), so batch size and beams never multiply
# past it: 1024 is a batch of 64 images at 16 beams.
MAX_SEQUENCES = 1024
# Processes (or threads) opening and preprocessing images: each process holds its own copy of the image pipeline, and
# past the machine's cores more only add memory; 64 covers the largest single machines.
MAX_WORKERS = 64
# Pixels of an image as stored, read from its header before anything is decoded (PIL's own bomb limit is a warning up
# to twice its 89 M): a 64-megapixel photo is the largest a phone takes.
MAX_IMAGE_PIXELS = 64_000_000
# Longest side over shortest side, from the header: image processors resize the shortest side to the model's size,
# so a 600000x1 strip (1.8 KB as a PNG) would be upscaled to 6.4 GB. A 100:1 strip is past any panorama.
MAX_ASPECT_RATIO = 100
# Pixels after the image processor's resize (computed from its settings before it runs): what a 224-pixel CLIP
# processor makes of a 100:1 image (5 M) fits; a larger processor with an extreme image does not.
MAX_RESIZED_PIXELS = 8_000_000

# -- the server's own settings ----------------------------------------------------------------------------------------
MAX_UPLOAD_MB = 1024.0  # one request's body; it is held in memory while its images are opened
MAX_REQUEST_SECONDS = 3600.0  # a request's time limit, queueing included: past an hour a client has gone
MAX_IMAGES_PER_REQUEST = 256  # each image is opened and preprocessed before the request is queued
MAX_QUEUE = 100_000  # requests waiting for the model; each holds its preprocessed images


def images_per_run(batch_size: int, num_beams: int, num_return_sequences: int = 1) -> int:
    """How many images one `generate` run takes: `batch_size`, fewer when their sequences would pass MAX_SEQUENCES."""
    return max(1, min(batch_size, MAX_SEQUENCES // max(num_beams, num_return_sequences, 1)))


def check_range(name: str, value, low=None, high=None) -> None:
    """ClipCapError naming `name` unless low <= value <= high (a bound left None is not checked)."""
    if low is not None and value < low:
        raise ClipCapError(f"`{name}` must be at least {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ClipCapError(f"`{name}` must be at most {high:g}, got {value!r}")


def context_length(lm_config) -> int | None:
    """The LM's context in tokens (`n_positions` / `max_position_embeddings` of its text config), or None when the
    config states none (no bound then but MAX_NEW_TOKENS)."""
    if hasattr(lm_config, "get_text_config"):
        lm_config = lm_config.get_text_config()
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(lm_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def room_for_new_tokens(context: int | None, prefix_tokens: int, prompt_tokens: int = 0) -> int:
    """How many new tokens fit after the prefix and the prompt: the context less both, at most MAX_NEW_TOKENS.
    ClipCapError when not even one fits."""
    if context is None:
        return MAX_NEW_TOKENS
    room = context - prefix_tokens - prompt_tokens
    if room < 1:
        what = f"the prefix ({prefix_tokens} tokens)" + (f" and the prompt ({prompt_tokens})" if prompt_tokens else "")
        raise ClipCapError(f"{what} leave no room for a caption in the language model's context of {context} tokens")
    return min(room, MAX_NEW_TOKENS)


def fit_new_tokens(max_new_tokens: int, context: int | None, prefix_tokens: int, prompt_tokens: int = 0) -> int:
    """A default caption length cut to what the context leaves (a default never fails)."""
    return min(max_new_tokens, room_for_new_tokens(context, prefix_tokens, prompt_tokens))


def check_decoding(
    *,
    num_beams: int,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    context: int | None = None,
    prefix_tokens: int = 0,
    prompt_tokens: int = 0,
    candidates: bool = False,
) -> None:
    """ClipCapError unless the decoding settings are within bounds: beams, captions, new tokens and the sampling
    settings each, and prefix + prompt + new tokens within the LM's `context` (None: unknown). Called before any
    image is opened and again just before `generate` (for callers of the models themselves)."""
    # Candidate lists for reranking may be wider than the beams and captions a user asks for directly.
    check_range("num_beams", num_beams, 1, MAX_CANDIDATES if candidates else MAX_BEAMS)
    check_range("num_return_sequences", num_return_sequences, 1, MAX_CANDIDATES if candidates else MAX_CAPTIONS)
    check_range("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    if temperature is not None and do_sample:
        check_range("temperature", temperature, MIN_TEMPERATURE)
    if top_p is not None and do_sample:
        check_range("top_p", top_p, 0.0, MAX_TOP_P)
    if repetition_penalty is not None:
        check_range("repetition_penalty", repetition_penalty, MIN_REPETITION_PENALTY)
    if not do_sample and num_return_sequences > num_beams:
        raise ClipCapError(
            f"{num_return_sequences} captions per image need at least {num_return_sequences} beams or sampling"
        )
    room = room_for_new_tokens(context, prefix_tokens, prompt_tokens)
    if context is not None and max_new_tokens > room:
        used = f"the prefix ({prefix_tokens} tokens)" + (f" and the prompt ({prompt_tokens})" if prompt_tokens else "")
        raise ClipCapError(
            f"`max_new_tokens` {max_new_tokens} does not fit the language model's context of {context} tokens after "
            f"{used}: at most {room}"
        )


def resized_size(size, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) an image processor's resize makes of a `width` x `height` image, from its `size` setting
    ({"shortest_edge"[, "longest_edge"]}, {"height", "width"}, {"longest_edge"}, or one int for a square), or None
    for a setting not known here."""
    if isinstance(size, int):
        return size, size
    if not isinstance(size, dict) and hasattr(size, "__dict__"):  # transformers' SizeDict
        size = {k: v for k, v in vars(size).items() if v is not None}
    if not isinstance(size, dict):
        return None
    short, long = min(width, height), max(width, height)
    if size.get("height") and size.get("width"):
        return int(size["width"]), int(size["height"])
    if size.get("shortest_edge"):
        new_short, new_long = size["shortest_edge"], size["shortest_edge"] * long / short
        if size.get("longest_edge") and new_long > size["longest_edge"]:
            new_short, new_long = new_short * size["longest_edge"] / new_long, size["longest_edge"]
    elif size.get("longest_edge"):
        new_short, new_long = size["longest_edge"] * short / long, size["longest_edge"]
    else:
        return None
    new_short, new_long = max(1, int(new_short)), int(new_long)
    return (new_long, new_short) if width >= height else (new_short, new_long)
