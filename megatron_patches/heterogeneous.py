"""Per-layer query heads for megatron-core's heterogeneous transformer config.

Written for megatron-core 0.16.x. `HeterogeneousTransformerConfig.get_config_for_layer` applies
a layer's `num_query_groups` and `ffn_hidden_size` from the Nemotron-NAS `block_configs` JSON,
but `num_attention_heads` stays global. Pruning gives every layer its own head count, so this
subclass also reads `attention.num_attention_heads` from the same JSON. It is an extension
through megatron's own seam (the config object each layer is built from), not a fork.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.heterogeneous.heterogeneous_config import (
    HeterogeneousTransformerConfig,
)


@dataclass
class PerLayerHeadsTransformerConfig(HeterogeneousTransformerConfig):
    """A heterogeneous config whose layers may differ in query heads too."""

    def __post_init__(self) -> None:
        super().__post_init__()
        blocks = json.loads(self.heterogeneous_layers_config_encoded_json)["block_configs"]
        self._layer_heads = [block["attention"].get("num_attention_heads") for block in blocks]

    def get_config_for_layer(self, layer_number: int) -> TransformerConfig:
        layer_config = super().get_config_for_layer(layer_number)
        heads = self._layer_heads[layer_number - 1]
        if heads is None or heads == layer_config.num_attention_heads:
            return layer_config
        # `replace` re-runs __post_init__, which re-validates heads against TP and groups.
        return dataclasses.replace(layer_config, num_attention_heads=heads)
