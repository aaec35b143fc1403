"""OrtCausalLM: a causal LM whose forward runs an exported decoder graph in ONNX Runtime, for transformers' generate."""

from __future__ import annotations

import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .exported import decoder_input_names

# The output field generate reads the cache from: transformers 5 renamed past_key_values to cache.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class OrtCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose forward is the exported decoder graph, so that transformers' `generate` drives it.

    The cache is a transformers DynamicCache holding the graph's present keys/values, so beam search reorders it as
    it would a PyTorch LM's. Runs on the CPU in float32 (int8 weights stay inside the graph)."""

    def __init__(self, config, session):
        super().__init__(config)
        self.session = session
        self.num_layers = (len(session.get_inputs()) - 3) // 2
        _, self.kv_heads, _, self.head_dim = session.get_inputs()[3].shape
        self.hidden = session.get_inputs()[0].shape[2]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None, past_key_values=None, **_):
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is not None:
            batch = inputs_embeds.shape[0]
            input_ids = torch.zeros(batch, 0, dtype=torch.long)
        else:
            batch = input_ids.shape[0]
            inputs_embeds = torch.zeros(batch, 0, self.hidden)
        if cache is None:
            cache = DynamicCache()
        filled = len(cache.layers) == self.num_layers and all(layer.is_initialized for layer in cache.layers)
        if filled:
            past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        else:
            past = [torch.zeros(batch, self.kv_heads, 0, self.head_dim)] * (2 * self.num_layers)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past[0].shape[2] + inputs_embeds.shape[1] + input_ids.shape[1])
        feed = (inputs_embeds.float(), input_ids.long(), attention_mask.long(), *past)
        names = decoder_input_names(self.num_layers)
        out = self.session.run(None, {n: t.contiguous().numpy() for n, t in zip(names, feed, strict=True)})
        present = [torch.from_numpy(a) for a in out[1:]]
        for i in range(self.num_layers):
            keys, values = present[2 * i], present[2 * i + 1]
            if filled:  # the graph already appended this step: take its tensors instead of concatenating again
                cache.layers[i].keys, cache.layers[i].values = keys, values
            else:
                cache.update(keys, values, i)
        return CausalLMOutputWithPast(logits=torch.from_numpy(out[0]), **{_CACHE_FIELD: cache})
