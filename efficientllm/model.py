"""Architecture → megatron-core GPTModel chunks for this rank (Llama-style, uniform or not).

Every model is built through megatron-core's heterogeneous layer spec, with the per-layer
widths taken from the Architecture; a uniform model is simply the case where all layers agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from efficientllm import distributed
from efficientllm.architecture import Architecture
from efficientllm.config import Config, ConfigError
from megatron_patches.heterogeneous import PerLayerHeadsTransformerConfig
from megatron_patches.norm import SequenceParallelTorchNorm


class TransformerEngineUnavailable(ConfigError):
    """`transformer_engine` was asked for on a machine where it cannot be imported."""


def require_transformer_engine(field: str) -> None:
    """Refuse, in one line naming the config field, when Transformer Engine cannot be used."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _megatron_te  # noqa: F401
    except (ImportError, OSError) as err:  # OSError: TE installed, its CUDA libraries not
        raise TransformerEngineUnavailable(
            f"{field}=transformer_engine needs Transformer Engine, which cannot be imported here "
            f"({type(err).__name__}: {err}); use the GPU image (Dockerfile) or set {field}=local"
        ) from None


@dataclass(frozen=True)
class ModelOptions:
    """How the Architecture is laid out and computed; nothing here is a width."""

    seq_length: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    bf16: bool = False
    transformer_engine: bool = False
    init_method_std: float = 0.02
    init_seed: int = 1234
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    rope_scaling_factor: float | None = None  # Llama 3.x RoPE scaling (megatron's), off when None


TRANSFORMER_ENGINE = "transformer_engine"


# Which spec builds the model at a step: with `model.transformer_impl_after_pruning` the trainer
# rebuilds the pruned model once the pruning phase ends (training/after_pruning.py).
def rebuilds_after_pruning(config: Config) -> bool:
    return config.prune.enabled and config.model.transformer_impl_after_pruning is not None


def rebuilt_after_pruning(config: Config, iteration: int) -> bool:
    """Whether a model at `iteration` (steps completed) is the rebuilt one: no event happens
    after `prune.end_step`."""
    return rebuilds_after_pruning(config) and iteration >= config.prune.end_step


def uses_transformer_engine(config: Config, iteration: int) -> bool:
    """Whether the model at `iteration` is built with the TE spec."""
    m = config.model
    impl = m.transformer_impl_after_pruning if rebuilt_after_pruning(config, iteration) else m.transformer_impl
    return impl == TRANSFORMER_ENGINE


def model_options(config: Config, iteration: int = 0) -> ModelOptions:
    """How the model is built at `iteration` (the spec may change after pruning)."""
    p = config.parallel
    return ModelOptions(
        seq_length=config.data.seq_length,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=config.training.bf16,
        transformer_engine=uses_transformer_engine(config, iteration),
        init_method_std=config.model.init_method_std,
        init_seed=config.training.seed,
        rotary_base=config.model.rotary_base,
        norm_epsilon=config.model.norm_epsilon,
        rope_scaling_factor=config.model.rope_scaling_factor if config.model.use_rope_scaling else None,
    )


def transformer_config(arch: Architecture, options: ModelOptions,
                       initialize: bool = True) -> PerLayerHeadsTransformerConfig:
    first = arch.layers[0]
    dtype = torch.bfloat16 if options.bf16 else torch.float32
    return PerLayerHeadsTransformerConfig(
        heterogeneous_layers_config_encoded_json=arch.block_configs_json(),
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=first.num_attention_heads,
        num_query_groups=first.num_query_groups,
        ffn_hidden_size=first.ffn_hidden_size,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=options.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=options.init_method_std,
        tensor_model_parallel_size=options.tensor_model_parallel_size,
        pipeline_model_parallel_size=options.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=options.virtual_pipeline_model_parallel_size,
        sequence_parallel=options.sequence_parallel,
        bf16=options.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Initialise full weights on the CPU generator, then split: the same seed gives the
        # same model at every TP/PP layout. A model whose values are copied in right after
        # (a pruning event's) draws nothing; it is still laid out on the CPU first, so that its
        # non-parameter state (RoPE frequencies) is computed exactly as in a fresh model.
        use_cpu_initialization=True,
        perform_initialization=initialize,
        # Fused kernels need apex/TE; megatron falls back to plain torch when these are off.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        # gloo matches messages between two ranks in FIFO order; batched isend/irecv posts the
        # two directions in an order that swaps them when prev == next (interleaved PP=2).
        batch_p2p_comm=torch.cuda.is_available(),
    )


class SeededTransformerLayer(TransformerLayer):
    """Re-seeds the CPU generator from the global layer number before drawing its weights, so
    a layer's initial weights do not depend on which pipeline stage builds it (or what that
    stage built before). The output layer, built after the last layer, inherits the property."""

    init_seed: int = 0

    def __init__(self, config, submodules, layer_number: int = 1, vp_stage: int | None = None, **kwargs):
        # megatron passes the stage-local number and adds the stage's offset itself.
        offset = get_transformer_layer_offset(config, vp_stage, parallel_state.get_pipeline_model_parallel_rank())
        torch.manual_seed(self.init_seed + 1_000_003 * (layer_number + offset))
        super().__init__(config, submodules, layer_number=layer_number, vp_stage=vp_stage, **kwargs)


def layer_spec(config: PerLayerHeadsTransformerConfig, options: ModelOptions, vp_stage: int | None) -> ModuleSpec:
    spec = get_gpt_heterogeneous_layer_spec(
        config, use_te=options.transformer_engine, vp_stage=vp_stage
    )
    for layer in spec.layer_specs:
        layer.module = SeededTransformerLayer
    if config.sequence_parallel and not options.transformer_engine:
        _use_sequence_parallel_norms(spec)
    return spec


def _use_sequence_parallel_norms(block_spec) -> None:
    """Swap megatron's torch norm, which refuses sequence parallelism, for ours."""
    if block_spec.layer_norm is WrappedTorchNorm:
        block_spec.layer_norm = SequenceParallelTorchNorm
    for spec in block_spec.layer_specs:
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(spec.submodules, name) is WrappedTorchNorm:
                setattr(spec.submodules, name, SequenceParallelTorchNorm)


def build_model_chunks(arch: Architecture, options: ModelOptions, initialize: bool = True) -> list[GPTModel]:
    """The GPTModel chunks this rank holds (one, or one per virtual pipeline stage), on this
    rank's device; under bf16 every parameter is bf16 (the optimizer keeps fp32 main params).
    `initialize=False` leaves the weights unset (torch.empty) and without megatron's
    tensor-parallel attributes, which its init sets: the caller copies both in."""
    arch.validate(options.tensor_model_parallel_size)
    if options.transformer_engine:
        require_transformer_engine("model.transformer_impl")
    config = transformer_config(arch, options, initialize)
    vp_size = options.virtual_pipeline_model_parallel_size
    stages = [None] if vp_size is None else list(range(vp_size))
    SeededTransformerLayer.init_seed = options.init_seed
    # The embedding is drawn first on the first stage, from the run's seed, at every layout.
    torch.manual_seed(options.init_seed)
    chunks = []
    for vp_stage in stages:
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=layer_spec(config, options, vp_stage),
                vocab_size=arch.vocab_size,
                max_sequence_length=options.seq_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                share_embeddings_and_output_weights=arch.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=options.rotary_base,
                rope_scaling=options.rope_scaling_factor is not None,
                rope_scaling_factor=options.rope_scaling_factor or 8.0,
                vp_stage=vp_stage,
            )
        )
    # Drawn on the CPU generator above, then moved. bf16 casts the norms too, as megatron's
    # Float16Module does (its fp32 norms would break the fp16 optimizer's param groups); its
    # forward-time casts are not needed here: token ids go in and the loss comes out in fp32.
    dtype = torch.bfloat16 if options.bf16 else None
    if not initialize:  # nothing was drawn: allocate on the device rather than copy garbage there
        chunks = [chunk.to_empty(device=distributed.device()) for chunk in chunks]
    return [chunk.to(device=distributed.device(), dtype=dtype) for chunk in chunks]
