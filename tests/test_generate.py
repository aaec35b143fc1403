"""ClipCapModel.generate: the LM's own generate over the prefix, checked against plain uncached loops."""

import pytest
import torch
import torch.nn.functional as F

from clipcap.errors import ClipCapError
from tests import tiny

LMS = {"gpt2": tiny.tiny_gpt2, "opt": tiny.tiny_opt, "llama": tiny.tiny_llama}


def varied_model(lm_name: str = "gpt2", mapping: str = "mlp", **overrides):
    return tiny.tiny_model(mapping, lm=tiny.varied_lm(LMS[lm_name]), **overrides)


def clip_batch(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def naive_greedy(model, clip: torch.Tensor, steps: int) -> list[list[int]]:
    """The original repo's decoding: one image at a time, no cache, the whole sequence recomputed every step."""
    embed = model.lm.get_input_embeddings()
    rows = []
    for c in clip:
        seq = model.prefix(c[None])
        tokens = []
        for _ in range(steps):
            logits = model.lm(inputs_embeds=seq, use_cache=False).logits[:, -1]
            tok = logits.argmax(-1)
            tokens.append(int(tok))
            seq = torch.cat((seq, embed(tok)[:, None]), dim=1)
        rows.append(tokens)
    return rows


@torch.no_grad()
def sequence_logprob(model, clip_row: torch.Tensor, tokens: torch.Tensor) -> float:
    """Sum of log p(token_t | prefix, tokens_<t) by one full forward pass."""
    k = model.config.prefix_length
    logits = model(clip_row[None], tokens[None]).logits[0, k - 1 : -1]
    return float(F.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).sum())


@pytest.mark.parametrize("lm_name", sorted(LMS))
def test_greedy_equals_uncached_step_by_step_loop(lm_name):
    model = varied_model(lm_name)
    clip = clip_batch(4)
    ids = model.generate(clip, max_new_tokens=12, stop_token_id=None)
    expected = naive_greedy(model, clip, 12)
    assert ids.tolist() == expected
    assert len({tuple(r) for r in expected}) == 4 and all(len(set(r)) > 2 for r in expected)  # a non-trivial check


def test_greedy_equals_loop_with_transformer_mapper_and_frozen_lm():
    model = varied_model("gpt2", mapping="transformer", tune_lm=False)
    clip = clip_batch(3, seed=1)
    assert model.generate(clip, max_new_tokens=10, stop_token_id=None).tolist() == naive_greedy(model, clip, 10)


def test_batched_equals_one_by_one_greedy_and_beam():
    model = varied_model("gpt2")
    clip = clip_batch(3, seed=2)
    for kwargs in (dict(num_beams=1), dict(num_beams=4, num_return_sequences=2)):
        batched = model.generate(clip, max_new_tokens=8, stop_token_id=None, **kwargs)
        single = torch.cat([model.generate(c[None], max_new_tokens=8, stop_token_id=None, **kwargs) for c in clip])
        assert batched.tolist() == single.tolist()


def test_beam_search_shapes_and_ranking():
    model = varied_model("llama")
    clip = clip_batch(2, seed=3)
    ids = model.generate(clip, max_new_tokens=7, num_beams=5, num_return_sequences=5, stop_token_id=None)
    assert ids.shape == (2 * 5, 7) and ids.dtype == torch.long
    for i in range(2):
        rows = ids[i * 5 : (i + 1) * 5]
        assert len({tuple(r) for r in rows.tolist()}) == 5  # distinct hypotheses
        scores = [sequence_logprob(model, clip[i], r) for r in rows]
        # without a stop token all hypotheses have the same length, so the order is by total log-probability
        assert scores == sorted(scores, reverse=True)
    best = model.generate(clip, max_new_tokens=7, num_beams=5, stop_token_id=None)
    assert best.shape == (2, 7)
    assert best.tolist() == ids[::5].tolist()


def test_beam_search_stops_and_pads_per_row():
    model = varied_model("gpt2")
    clip = clip_batch(4, seed=4)
    free = model.generate(clip, max_new_tokens=10, num_beams=3, num_return_sequences=3, stop_token_id=None)
    stop = int(torch.mode(free[:, 2:6].flatten()).values)  # a token beam search produces early and often
    ids = model.generate(clip, max_new_tokens=10, num_beams=3, num_return_sequences=3, stop_token_id=stop)
    pad = model.pad_token_id
    assert ids.shape == (12, 10) and pad == 0 and pad != stop
    early = 0
    for row in ids.tolist():
        assert row.count(stop) <= 1
        if stop in row:
            end = row.index(stop) + 1
            # transformers' beam search fills with the eos id when the pad id is 0: generate() must not
            assert row[end:] == [pad] * (10 - end)
            early += end < 10
    assert early >= 3


def test_sampling_shapes_and_reproducibility():
    model = varied_model("opt")
    clip = clip_batch(3, seed=5)
    torch.manual_seed(0)
    a = model.generate(clip, max_new_tokens=9, do_sample=True, num_return_sequences=4, stop_token_id=None)
    torch.manual_seed(0)
    b = model.generate(clip, max_new_tokens=9, do_sample=True, num_return_sequences=4, stop_token_id=None)
    assert a.shape == (12, 9)
    assert torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) > 6  # samples differ from one another
    greedy = model.generate(clip, max_new_tokens=9, stop_token_id=None)
    assert not torch.equal(a[::4], greedy)


def test_sampling_kwargs_reach_the_lm_generate():
    model = varied_model("gpt2")
    clip = clip_batch(4, seed=6)
    greedy = model.generate(clip, max_new_tokens=10, stop_token_id=None)
    # top_k=1 and a tiny top_p keep only the most likely token: sampling then must equal greedy decoding
    for kwargs in (dict(top_k=1), dict(top_p=1e-6, top_k=0)):
        torch.manual_seed(1)
        assert torch.equal(
            model.generate(clip, max_new_tokens=10, do_sample=True, stop_token_id=None, **kwargs), greedy
        )
    runs = {}
    for temperature in (1.0, 1e4):
        torch.manual_seed(1)
        runs[temperature] = model.generate(
            clip, max_new_tokens=10, do_sample=True, temperature=temperature, top_k=0, stop_token_id=None
        )
    assert not torch.equal(runs[1.0], runs[1e4])
    with pytest.raises(ClipCapError, match="`temperature` must be at least 0.01, got -1.0"):  # clipcap.limits
        model.generate(clip, max_new_tokens=3, do_sample=True, temperature=-1.0)


@pytest.mark.filterwarnings("ignore:Passing `no_repeat_ngram_size` with `inputs_embeds`")  # n-grams of new tokens only
def test_repetition_controls_pass_through():
    model = varied_model("llama")
    clip = clip_batch(4, seed=7)
    plain = model.generate(clip, max_new_tokens=12, stop_token_id=None)
    assert any(len(set(r)) < 12 for r in plain.tolist())  # greedy repeats some token ...
    ids = model.generate(clip, max_new_tokens=12, stop_token_id=None, no_repeat_ngram_size=1)
    assert all(len(set(r)) == 12 for r in ids.tolist())  # ... which no_repeat_ngram_size=1 forbids


def test_stop_token_from_config_and_none_disables_stopping():
    model = varied_model("gpt2")
    clip = clip_batch(4, seed=8)
    free = model.generate(clip, max_new_tokens=10, stop_token_id=None)
    assert free.shape == (4, 10)
    stop = int(free[0, 3])
    # the LM's own eos (and its generation_config) must not stop us when stopping is disabled
    model.lm.config.eos_token_id = stop
    model.lm.generation_config.eos_token_id = stop
    assert torch.equal(model.generate(clip, max_new_tokens=10, stop_token_id=None), free)
    model.config.stop_token_id = stop
    ids = model.generate(clip, max_new_tokens=10)  # default: config.stop_token_id
    ends = [row.index(stop) + 1 if stop in row else 10 for row in free.tolist()]
    assert ids.shape == (4, max(ends))
    for r, end in enumerate(ends):
        assert ids[r, :end].tolist() == free[r, :end].tolist()
        assert all(t == model.pad_token_id for t in ids[r, end:].tolist())
    assert torch.equal(model.generate(clip, max_new_tokens=10, stop_token_id=None), free)


def test_default_max_new_tokens_is_the_papers_67():
    model = tiny.tiny_model("mlp")
    assert model.generate(clip_batch(1), stop_token_id=None).shape == (1, 67)


def test_the_lms_own_generation_defaults_do_not_apply():
    # e.g. a chat LM's generation_config.json with sampling and repetition settings
    model = varied_model("llama")
    clip = clip_batch(3, seed=9)
    expected = naive_greedy(model, clip, 10)
    gc = model.lm.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p = True, 0.6, 5, 0.9
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens = 3.0, 1, 10
    assert model.generate(clip, max_new_tokens=10, stop_token_id=None).tolist() == expected
    torch.manual_seed(0)
    a = model.generate(clip, max_new_tokens=10, do_sample=True, stop_token_id=None)
    gc.temperature, gc.top_k, gc.top_p = None, None, None
    torch.manual_seed(0)
    assert torch.equal(model.generate(clip, max_new_tokens=10, do_sample=True, stop_token_id=None), a)


def test_generate_is_quiet(hf_warnings):
    model = varied_model("gpt2")
    model.generate(clip_batch(2), max_new_tokens=3)
    model.generate(clip_batch(2), max_new_tokens=3, num_beams=2, stop_token_id=None)
    # A row that stops first feeds its pad id back while the others decode: transformers' "pass an
    # attention_mask" notice (logged once per process, so the fixture clears that memory) has nothing to act on.
    clip = clip_batch(4)
    stop = int(model.generate(clip, max_new_tokens=1, stop_token_id=None)[0, 0])
    model.lm.config.pad_token_id = model.config.pad_token_id = stop
    ids = model.generate(clip, max_new_tokens=4, stop_token_id=stop)
    assert ids[0].tolist() == [stop] * 4 and (ids[:, 1] != stop).any()  # row 0 done, another one decoding
    assert [r.getMessage() for r in hf_warnings] == []  # e.g. no "both max_new_tokens and max_length set"
