"""The Architecture: the one source of truth for every shape in a model.

Hidden size, vocab and head dim are shared by all layers; each layer has its own number of
query heads, KV groups and FFN channels. Every model is built from an Architecture, every
checkpoint stores one, and pruning produces a new one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from efficientllm.config import Config


class ArchitectureError(ValueError):
    """A shape that cannot be built, or cannot be split the way it was asked to be."""


@dataclass(frozen=True)
class LayerWidths:
    """The widths of one transformer block."""

    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


@dataclass(frozen=True)
class Architecture:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, GQA, no biases."""

    hidden_size: int
    vocab_size: int
    head_dim: int
    layers: tuple[LayerWidths, ...]
    tie_embeddings: bool = False

    @classmethod
    def uniform(
        cls,
        *,
        hidden_size: int,
        num_layers: int,
        num_attention_heads: int,
        num_query_groups: int,
        ffn_hidden_size: int,
        vocab_size: int,
        head_dim: int | None = None,
        tie_embeddings: bool = False,
    ) -> "Architecture":
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ArchitectureError(
                    f"hidden_size {hidden_size} is not divisible by num_attention_heads "
                    f"{num_attention_heads}; set head_dim explicitly"
                )
            head_dim = hidden_size // num_attention_heads
        layer = LayerWidths(num_attention_heads, num_query_groups, ffn_hidden_size)
        arch = cls(hidden_size, vocab_size, head_dim, (layer,) * num_layers, tie_embeddings)
        arch.validate()
        return arch

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    def layer_parameters(self, layer: LayerWidths) -> int:
        h, d = self.hidden_size, self.head_dim
        qkv = h * (layer.num_attention_heads + 2 * layer.num_query_groups) * d
        proj = layer.num_attention_heads * d * h
        mlp = 3 * h * layer.ffn_hidden_size  # gate + up rows, down columns
        return qkv + proj + mlp + 2 * h  # two RMSNorm weights

    def embedding_parameters(self) -> int:
        """The input embedding and, when untied, the output layer."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def num_parameters(self) -> int:
        final_norm = self.hidden_size
        return self.embedding_parameters() + final_norm + sum(self.layer_parameters(l) for l in self.layers)

    def params_keeping_non_embedding(self, fraction: float) -> int:
        """A parameter count that keeps the embedding and `fraction` of everything else."""
        embeddings = self.embedding_parameters()
        return round(embeddings + fraction * (self.num_parameters() - embeddings))

    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ArchitectureError naming the first width that cannot be built at this TP size."""
        tp = tensor_parallel_size
        for name in ("hidden_size", "vocab_size", "head_dim"):
            if getattr(self, name) <= 0:
                raise ArchitectureError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.layers:
            raise ArchitectureError("an Architecture needs at least one layer")
        if self.vocab_size % tp:
            raise ArchitectureError(
                f"vocab_size {self.vocab_size} is not divisible by tensor_model_parallel_size {tp}"
            )
        for i, layer in enumerate(self.layers):
            heads, groups, ffn = (
                layer.num_attention_heads,
                layer.num_query_groups,
                layer.ffn_hidden_size,
            )
            if heads <= 0 or groups <= 0 or ffn <= 0:
                raise ArchitectureError(f"layer {i}: widths must be positive, got {layer}")
            if heads % groups:
                raise ArchitectureError(
                    f"layer {i}: num_attention_heads {heads} is not divisible by "
                    f"num_query_groups {groups} (GQA needs an equal number of heads per group)"
                )
            for field, width in (("num_query_groups", groups), ("ffn_hidden_size", ffn)):
                if width % tp:
                    raise ArchitectureError(
                        f"layer {i}: {field} {width} is not divisible by "
                        f"tensor_model_parallel_size {tp}; valid TP sizes: "
                        f"{self.valid_tensor_parallel_sizes()}"
                    )

    def valid_tensor_parallel_sizes(self, up_to: int = 64) -> list[int]:
        """TP sizes that divide every width (what a checkpoint can be loaded at)."""
        widths = [self.vocab_size] + [
            w for l in self.layers for w in (l.num_query_groups, l.ffn_hidden_size)
        ]
        return [tp for tp in range(1, up_to + 1) if all(w % tp == 0 for w in widths)]

    def replace_layer(self, index: int, **widths: int) -> "Architecture":
        layers = list(self.layers)
        layers[index] = dataclasses.replace(layers[index], **widths)
        return dataclasses.replace(self, layers=tuple(layers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "head_dim": self.head_dim,
            "tie_embeddings": self.tie_embeddings,
            "layers": [dataclasses.asdict(l) for l in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Architecture":
        try:
            layers = tuple(LayerWidths(**layer) for layer in data["layers"])
            arch = cls(
                hidden_size=int(data["hidden_size"]),
                vocab_size=int(data["vocab_size"]),
                head_dim=int(data["head_dim"]),
                layers=layers,
                tie_embeddings=bool(data.get("tie_embeddings", False)),
            )
        except (KeyError, TypeError) as err:
            raise ArchitectureError(f"malformed architecture record: {err}") from err
        arch.validate()
        return arch

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Architecture":
        return cls.from_dict(json.loads(text))

    def block_configs_json(self) -> str:
        """The per-layer widths as megatron-core's heterogeneous `block_configs` JSON."""
        blocks = [
            {
                "attention": {
                    "no_op": False,
                    "replace_with_linear": False,
                    "num_query_groups": l.num_query_groups,
                    "num_attention_heads": l.num_attention_heads,
                },
                "ffn": {
                    "no_op": False,
                    "replace_with_linear": False,
                    "ffn_hidden_size": l.ffn_hidden_size,
                },
            }
            for l in self.layers
        ]
        return json.dumps({"block_configs": blocks})

    def table(self) -> str:
        """A per-layer table for logs and reports."""
        rows = [f"{'layer':>5} {'heads':>6} {'kv':>4} {'ffn':>7} {'params':>12}"]
        for i, l in enumerate(self.layers):
            rows.append(
                f"{i:>5} {l.num_attention_heads:>6} {l.num_query_groups:>4} "
                f"{l.ffn_hidden_size:>7} {self.layer_parameters(l):>12,}"
            )
        rows.append(
            f"hidden {self.hidden_size}, head_dim {self.head_dim}, vocab {self.vocab_size}, "
            f"total {self.num_parameters():,} parameters"
        )
        return "\n".join(rows)


def architecture_from_config(config: "Config", vocab_size: int) -> Architecture:
    """The model's shapes from the config; vocab padded like Megatron-LM (to a multiple of
    make_vocab_size_divisible_by x TP) unless set explicitly."""
    m = config.model
    if m.vocab_size is None:
        multiple = m.make_vocab_size_divisible_by * config.parallel.tensor_model_parallel_size
        vocab_size = -(-vocab_size // multiple) * multiple
    else:
        vocab_size = m.vocab_size
    layers = m.layers or [
        {
            "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.num_query_groups,
            "ffn_hidden_size": m.ffn_hidden_size,
        }
    ] * m.num_layers
    head_dim = m.head_dim or m.hidden_size // layers[0]["num_attention_heads"]
    return Architecture.from_dict(
        {
            "hidden_size": m.hidden_size,
            "vocab_size": vocab_size,
            "head_dim": head_dim,
            "tie_embeddings": not m.untie_embeddings_and_output_weights,
            "layers": layers,
        }
    )


def model_shape_fields(arch: Architecture) -> dict[str, Any]:
    """The run config's model-section shape fields that build exactly `arch` (the inverse of
    `architecture_from_config`; per-layer widths only when the layers differ)."""
    first = arch.layers[0]
    return {
        "hidden_size": arch.hidden_size,
        "num_layers": arch.num_layers,
        "num_attention_heads": first.num_attention_heads,
        "num_query_groups": first.num_query_groups,
        "ffn_hidden_size": first.ffn_hidden_size,
        "head_dim": arch.head_dim,
        "layers": None if arch.is_uniform else [dataclasses.asdict(l) for l in arch.layers],
        "vocab_size": arch.vocab_size,
        "untie_embeddings_and_output_weights": not arch.tie_embeddings,
    }
