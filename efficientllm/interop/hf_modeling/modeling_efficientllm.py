"""A Llama whose layers each have their own width: transformers' Llama decoder layers, each built
from its layer's view of the config. Everything else (embeddings, RoPE, norms, cache, generate)
is transformers' LlamaForCausalLM."""

from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from .configuration_efficientllm import EfficientLLMConfig


class EfficientLLMModel(LlamaModel):
    config_class = EfficientLLMConfig

    def __init__(self, config: EfficientLLMConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config.for_layer(index), index) for index in range(config.num_hidden_layers)]
        )
        self.post_init()


class EfficientLLMForCausalLM(LlamaForCausalLM):
    config_class = EfficientLLMConfig

    def __init__(self, config: EfficientLLMConfig):
        super().__init__(config)
        self.model = EfficientLLMModel(config)
        self.post_init()
