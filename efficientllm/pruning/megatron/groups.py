"""The minimal parameter groups of the megatron-core GPT chunks on this rank, as index views
into the local (TP-sharded) weights.

A group's identity is global and independent of TP/PP: (kind, layer, index) with the layer
0-based in the Architecture and the index a global query head / KV group / FFN channel / hidden
channel. What a rank holds of it is described here with the LayerLayout index arithmetic:

- head: its d query rows of `linear_qkv` and its d columns of `linear_proj` (owner TP rank only).
- kv_group: its k and v rows of `linear_qkv` (removed with the group's last head).
- ffn: its gate row and up row of `linear_fc1`, its column of `linear_fc2` (owner rank only).
- hidden: every matrix column/row touching the channel on this rank. Column-parallel inputs
  (`linear_qkv`, `linear_fc1`, output layer), row-parallel outputs (`linear_proj`, `linear_fc2`)
  and the vocab-sharded embedding are true partial sums over TP. The RMSNorm weights are not
  groups of their own: a norm weight only scales the consumer columns it feeds, so removing
  those columns already removes what it does (see `saliency.py`).
- layer: a whole block (the module itself).

No collectives: the TP rank/size are read from megatron's parallel_state once. Index views are
made on the device of the weights they index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from efficientllm.architecture import Architecture
from efficientllm.pruning.layout import GroupSizes, LayerLayout

GROUP_KINDS = ("head", "kv_group", "ffn", "hidden", "layer")
# A module's key in the window statistics and surgery: (global layer, or None outside the
# decoder, and its short name: "linear_fc2", "input_layernorm", "output_layer", ...).
ModuleKey = tuple[int | None, str]


@dataclass(frozen=True)
class GroupId:
    """A group's global identity (layer is 0 for hidden groups)."""

    kind: str
    layer: int
    index: int


@dataclass(frozen=True)
class HiddenTouch:
    """A matrix outside the decoder layers on this rank that touches every hidden channel;
    `dim` is the dimension to reduce to get one value per hidden channel."""

    name: str
    param: torch.nn.Parameter
    dim: int


@dataclass
class LocalLayer:
    """One transformer block on this rank, with its groups' index views into the shards."""

    layer: int  # global, 0-based
    module: torch.nn.Module
    layout: LayerLayout
    tp_rank: int
    qkv: torch.nn.Parameter
    proj: torch.nn.Parameter
    fc1: torch.nn.Parameter
    fc2: torch.nn.Parameter
    # index views (local rows/columns), one row per local group, in global order:
    head_qkv_rows: torch.Tensor = field(init=False)  # [heads_local, d]
    head_proj_cols: torch.Tensor = field(init=False)  # [heads_local, d]
    kv_qkv_rows: torch.Tensor = field(init=False)  # [groups_local, 2d]
    ffn_fc1_rows: torch.Tensor = field(init=False)  # [ffn_local, 2] (gate, up)
    ffn_fc2_cols: torch.Tensor = field(init=False)  # [ffn_local]

    def __post_init__(self) -> None:
        lay, device = self.layout, self.qkv.device
        heads, groups = self.global_heads, self.global_kv_groups
        self.head_qkv_rows = torch.stack([lay.qkv_query_rows(k) for k in heads]).to(device)
        self.head_proj_cols = torch.stack([lay.proj_columns(k) for k in heads]).to(device)
        self.kv_qkv_rows = torch.stack([lay.qkv_key_value_rows(g) for g in groups]).to(device)
        # All of a rank's channels at once (one per channel would cost a call each, every event).
        self.ffn_fc1_rows = lay.kept_fc1_rows(self.tp_rank, ()).view(2, -1).T.contiguous().to(device)
        self.ffn_fc2_cols = lay.kept_fc2_columns(self.tp_rank, ()).to(device)
        d, w = lay.head_dim, lay.widths
        expected = {
            "linear_qkv": (lay.groups_per_rank * lay.qkv_rows_per_group, None),
            "linear_proj": (None, lay.heads_per_rank * d),
            "linear_fc1": (2 * lay.ffn_per_rank, None),
            "linear_fc2": (None, lay.ffn_per_rank),
        }
        for name, p in zip(expected, (self.qkv, self.proj, self.fc1, self.fc2)):
            rows, cols = expected[name]
            if (rows is not None and p.shape[0] != rows) or (cols is not None and p.shape[1] != cols):
                raise ValueError(
                    f"layer {self.layer}: {name} shard {tuple(p.shape)} does not match the "
                    f"Architecture's widths {w} at TP size {lay.tensor_parallel_size}"
                )

    @property
    def global_heads(self) -> range:
        return self.layout.heads_on_rank(self.tp_rank)

    @property
    def global_kv_groups(self) -> range:
        return self.layout.groups_on_rank(self.tp_rank)

    @property
    def global_ffn(self) -> range:
        return self.layout.ffn_on_rank(self.tp_rank)


@dataclass
class ShardGroups:
    """Every group this rank holds a part of."""

    arch: Architecture
    tp_rank: int
    tp_size: int
    layers: list[LocalLayer]  # in global layer order
    stem: list[HiddenTouch]  # embedding, untied output layer (where this rank has them)
    chunks: list[torch.nn.Module]  # the unwrapped GPTModel chunks (for hooks)

    def sizes(self) -> GroupSizes:
        """Parameters per group (both sides, whole model): `GroupSizes.of(arch)`."""
        return GroupSizes.of(self.arch)

    def ids(self, kind: str) -> list[GroupId]:
        """The global identities of the groups of `kind` this rank holds a part of."""
        if kind == "head":
            return [GroupId(kind, l.layer, k) for l in self.layers for k in l.global_heads]
        if kind == "kv_group":
            return [GroupId(kind, l.layer, g) for l in self.layers for g in l.global_kv_groups]
        if kind == "ffn":
            return [GroupId(kind, l.layer, c) for l in self.layers for c in l.global_ffn]
        if kind == "hidden":
            return [GroupId(kind, 0, i) for i in range(self.arch.hidden_size)]
        if kind == "layer":
            return [GroupId(kind, l.layer, l.layer) for l in self.layers]
        raise ValueError(f"unknown group kind {kind!r}; known: {list(GROUP_KINDS)}")


def as_chunks(model: list[torch.nn.Module] | torch.nn.Module) -> list[torch.nn.Module]:
    """The GPTModel chunks of a model given as one chunk or a list, DDP-wrapped or not."""
    return unwrap_model(list(model) if isinstance(model, (list, tuple)) else [model])


def shard_groups(model: list[torch.nn.Module] | torch.nn.Module, arch: Architecture) -> ShardGroups:
    """Describe the groups of the model chunks on this rank (DDP-wrapped or not)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    layers: list[LocalLayer] = []
    stem: list[HiddenTouch] = []
    gpts = as_chunks(model)
    for gpt in gpts:
        if getattr(gpt, "pre_process", False):
            stem.append(HiddenTouch("embedding", gpt.embedding.word_embeddings.weight, 0))
        for block in gpt.decoder.layers:
            index = block.layer_number - 1
            attn, mlp = block.self_attention, block.mlp
            layers.append(
                LocalLayer(
                    layer=index,
                    module=block,
                    layout=LayerLayout.of(arch, index, tp_size),
                    tp_rank=tp_rank,
                    qkv=attn.linear_qkv.weight,
                    proj=attn.linear_proj.weight,
                    fc1=mlp.linear_fc1.weight,
                    fc2=mlp.linear_fc2.weight,
                )
            )
        # A tied output layer is the embedding: counted once, on the first stage.
        untied = getattr(gpt, "post_process", False) and not arch.tie_embeddings
        if untied and gpt.output_layer.weight is not None:
            stem.append(HiddenTouch("output_layer", gpt.output_layer.weight, 0))
    layers.sort(key=lambda l: l.layer)
    return ShardGroups(arch, tp_rank, tp_size, layers, stem, gpts)
