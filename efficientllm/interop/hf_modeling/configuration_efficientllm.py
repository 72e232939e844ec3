"""Configuration of a Llama with per-layer widths (EfficientLLM's pruned models)."""

import copy

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


# A strict dataclass of its own (as transformers' configs are), so that its validators replace
# LlamaConfig's: a pruned hidden size need not be a multiple of any layer's heads.
@strict
class EfficientLLMConfig(LlamaConfig):
    """LlamaConfig plus one entry per layer for the widths pruning changes. The scalar
    num_attention_heads / num_key_value_heads / intermediate_size hold the widest layer's."""

    model_type = "efficientllm_llama"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None

    def validate_architecture(self):
        """Each layer's heads divide into its KV heads; head_dim is explicit, so heads need not
        divide hidden_size (LlamaConfig's own check)."""
        lists = (self.layer_num_attention_heads, self.layer_num_key_value_heads, self.layer_intermediate_size)
        if any(len(widths or []) != self.num_hidden_layers for widths in lists):
            raise ValueError(f"per-layer widths need {self.num_hidden_layers} entries each, "
                             f"got {[len(w or []) for w in lists]}")
        for index, (heads, kv) in enumerate(zip(*lists[:2])):
            if kv <= 0 or heads % kv:
                raise ValueError(f"layer {index}: {heads} attention heads do not divide into {kv} key/value heads")

    def for_layer(self, index):
        """A plain per-layer view: this config with layer `index`'s widths as the scalars."""
        layer = copy.copy(self)
        layer.num_attention_heads = self.layer_num_attention_heads[index]
        layer.num_key_value_heads = self.layer_num_key_value_heads[index]
        layer.intermediate_size = self.layer_intermediate_size[index]
        return layer
