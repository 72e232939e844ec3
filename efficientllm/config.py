"""The run config: typed sections, loaded from one YAML file plus `--set a.b=c` overrides.

Field names follow Megatron-LM where one exists. Defaults live here and only here; the shipped
`configs/default.yaml` is the `make run` job. Every problem is reported as one ConfigError line
naming the field and what would be valid, before any process group is formed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 8
    num_query_groups: int = 4
    ffn_hidden_size: int = 704
    head_dim: int | None = None
    # Explicit per-layer widths (a heterogeneous model): a list of
    # {num_attention_heads, num_query_groups, ffn_hidden_size}; overrides the uniform fields.
    layers: list[dict[str, int]] | None = None
    vocab_size: int | None = None  # None: the tokenizer's, padded like Megatron-LM
    make_vocab_size_divisible_by: int = 128
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    rotary_base: int = 10000
    transformer_impl: str = "local"  # local | transformer_engine


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False


@dataclass
class DataConfig:
    # Megatron-LM style: [prefix] or ["0.7", prefixA, "0.3", prefixB]; empty = default corpus.
    data_path: list[str] = field(default_factory=list)
    valid_data_path: list[str] = field(default_factory=list)
    split: str = "98,2,0"
    tokenizer_model: str | None = None  # None: train one on the training text
    tokenizer_vocab_size: int = 4096
    corpus: str = "stdlib"  # built-in corpus without data_path: stdlib | english_docs (data/corpus.py)
    corpus_max_bytes: int = 4_000_000  # cap on the built-in corpus
    corpus_heldout_fraction: float = 0.05
    seq_length: int = 256


@dataclass
class TrainingConfig:
    seed: int = 1234
    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_iters: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 20
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False  # None-free: on GPU set true; CPU runs fp32
    log_interval: int = 10
    eval_interval: int = 50
    eval_iters: int = 4
    tensorboard: bool = True
    # Stop early like Megatron-LM (checkpoint, then exit code 75, training/signals.py): at an
    # iteration divisible by exit_interval, or after exit_duration_in_mins of wall time; with
    # exit_signal_handler, SIGTERM and SIGUSR1 do the same at the next step boundary.
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = True


@dataclass
class CheckpointConfig:
    save: str | None = None  # directory; None: <run_dir>/checkpoints
    load: str | None = None
    save_interval: int | None = None  # None: only at the end (and when stopped early)
    keep_last: int = 2  # complete checkpoints kept; 0 keeps all
    # A damaged newest checkpoint is an error; with this, the previous complete one is loaded
    # instead (and the fallback is logged).
    fallback_to_previous: bool = False


@dataclass
class PruneConfig:
    """Pruning-aware pretraining: the budget falls linearly from the source size to the target
    between start_step and end_step, one event every `interval` steps."""

    enabled: bool = False
    target_params: int | None = None
    target_ratio: float | None = None  # fraction of the source size to keep, e.g. 0.4
    start_step: int = 0
    end_step: int = 0
    interval: int = 1
    align: int = 1  # ffn and hidden widths stay multiples of this (and of TP)
    min_heads_per_layer: int = 1
    min_query_groups: int = 1
    min_ffn_per_layer: int = 8
    min_hidden: int = 32
    max_ratio: dict[str, float] = field(default_factory=dict)  # per kind, per event
    kinds: list[str] = field(default_factory=lambda: ["head", "ffn", "hidden"])
    normalisation: str = "per_parameter"  # per_parameter | per_group
    kind_weights: dict[str, float] = field(default_factory=dict)  # per-parameter weights per kind
    compensation: str = "obs"  # obs | none
    damping: float = 0.01


SALIENCY_CRITERIA = ("fisher", "taylor")
SALIENCY_KINDS = ("head", "ffn", "hidden", "layer")


@dataclass
class SaliencyConfig:
    """Per-shard saliency accumulators and local Hessians (pruning/saliency.py, hessian.py).

    `criterion`: fisher = EMA of ½Σ g²w² (optimal brain damage, empirical Fisher diagonal);
    taylor = EMA of |Σ g w|. `hessian_window`: batches before a pruning event over which the
    consumer matrices' H = Σ XᵀX is collected. `kinds`: which groups are scored ("head" also
    scores the KV groups' k/v rows)."""

    enabled: bool = False
    criterion: str = "fisher"
    ema_beta: float = 0.9
    hessian_window: int = 4
    kinds: list[str] = field(default_factory=lambda: list(SALIENCY_KINDS))

    def __post_init__(self) -> None:
        _require(
            self.criterion in SALIENCY_CRITERIA,
            f"saliency.criterion must be one of {', '.join(SALIENCY_CRITERIA)}, got '{self.criterion}'",
        )
        _require(0.0 <= self.ema_beta < 1.0, f"saliency.ema_beta must be in [0, 1), got {self.ema_beta}")
        _require(self.hessian_window >= 0, f"saliency.hessian_window must be >= 0, got {self.hessian_window}")
        bad = [k for k in self.kinds if k not in SALIENCY_KINDS]
        _require(not bad, f"saliency.kinds: unknown kind '{bad[0] if bad else ''}'; valid: {', '.join(SALIENCY_KINDS)}")


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None) -> None:
        validate(self, world_size)


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(valid)}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against a dataclass field's annotation (ints widen to floats)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """A Config from its `to_dict()` form (e.g. the copy a checkpoint stores), validated."""
    config = _build(Config, data, "")
    validate(config)
    return config


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (default: the shipped default job) and apply `a.b=c` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}".splitlines()[0])
    for override in overrides or []:
        keys, value = _parse_override(override)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{override}': '{key}' is not a section")
        node[keys[-1]] = value
    config = _build(Config, data, "")
    validate(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_prune(pr: PruneConfig, t: TrainingConfig, tp: int) -> None:
    """What can be checked without the model; targets against the model are checked in setup."""
    if not pr.enabled:
        return
    _require(
        (pr.target_params is None) != (pr.target_ratio is None),
        "prune: set exactly one of prune.target_params and prune.target_ratio",
    )
    _require(
        pr.target_ratio is None or 0.0 < pr.target_ratio < 1.0,
        f"prune.target_ratio must be in (0, 1) (the fraction kept), got {pr.target_ratio}",
    )
    _require(
        0 <= pr.start_step <= pr.end_step <= t.train_iters,
        f"prune.start_step {pr.start_step} and end_step {pr.end_step} must satisfy "
        f"0 <= start_step <= end_step <= training.train_iters ({t.train_iters})",
    )
    _require(pr.interval >= 1, f"prune.interval must be >= 1, got {pr.interval}")
    _require(pr.align >= 1, f"prune.align must be >= 1, got {pr.align}")
    _require(
        pr.align % tp == 0 or tp % pr.align == 0,
        f"prune.align {pr.align} is incompatible with tensor_model_parallel_size {tp}: "
        f"use a multiple or a divisor of {tp}",
    )
    kinds = ("head", "ffn", "hidden", "layer")
    bad = [k for k in pr.kinds + list(pr.max_ratio) + list(pr.kind_weights) if k not in kinds]
    _require(not bad, f"prune: unknown group kind '{bad[0] if bad else ''}'; valid: {', '.join(kinds)}")
    _require(
        pr.normalisation in ("per_parameter", "per_group"),
        f"prune.normalisation must be per_parameter or per_group, got '{pr.normalisation}'",
    )
    _require(
        pr.compensation in ("obs", "none"),
        f"prune.compensation must be obs or none, got '{pr.compensation}'",
    )


def validate(config: Config, world_size: int | None = None) -> None:
    """Everything that can be checked without data or process groups."""
    m, p, d, t = config.model, config.parallel, config.data, config.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _require(tp >= 1, f"parallel.tensor_model_parallel_size must be >= 1, got {tp}")
    _require(pp >= 1, f"parallel.pipeline_model_parallel_size must be >= 1, got {pp}")
    vp = p.virtual_pipeline_model_parallel_size
    _require(
        vp is None or (vp >= 2 and pp >= 2),
        f"parallel.virtual_pipeline_model_parallel_size must be unset or >= 2 with pipeline "
        f"parallelism, got {vp} at pipeline_model_parallel_size {pp}",
    )
    num_layers = len(m.layers) if m.layers else m.num_layers
    stages = pp * (vp or 1)
    _require(
        num_layers % stages == 0,
        f"model.num_layers {num_layers} is not divisible by pipeline stages {stages} "
        f"(pipeline_model_parallel_size x virtual_pipeline_model_parallel_size)",
    )
    _require(
        not p.sequence_parallel or tp > 1,
        "parallel.sequence_parallel needs tensor_model_parallel_size > 1",
    )
    _require(
        m.transformer_impl in ("local", "transformer_engine"),
        f"model.transformer_impl must be 'local' or 'transformer_engine', got '{m.transformer_impl}'",
    )
    _require(d.seq_length > 0, f"data.seq_length must be positive, got {d.seq_length}")
    _require(d.corpus in ("stdlib", "english_docs"),
             f"data.corpus must be stdlib or english_docs, got '{d.corpus}'")
    _require(t.micro_batch_size > 0, f"training.micro_batch_size must be positive, got {t.micro_batch_size}")
    _require(t.train_iters > 0, f"training.train_iters must be positive, got {t.train_iters}")
    _require(
        t.lr_decay_style in ("cosine", "linear", "constant"),
        f"training.lr_decay_style must be cosine, linear or constant, got '{t.lr_decay_style}'",
    )
    _require(0 <= t.lr_warmup_iters < t.train_iters,
             f"training.lr_warmup_iters must be in [0, train_iters={t.train_iters}), got {t.lr_warmup_iters}")
    _validate_prune(config.prune, t, tp)
    if world_size is not None:
        _require(
            world_size % (tp * pp) == 0,
            f"world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {tp}x{pp}; use a world size that is a multiple of {tp * pp}",
        )
        dp = world_size // (tp * pp)
        per_step = t.micro_batch_size * dp
        _require(
            t.global_batch_size % per_step == 0,
            f"training.global_batch_size {t.global_batch_size} is not divisible by "
            f"micro_batch_size x data-parallel size = {t.micro_batch_size}x{dp}",
        )
        microbatches = t.global_batch_size // per_step
        _require(
            vp is None or microbatches % pp == 0,
            f"the interleaved pipeline schedule needs the number of micro-batches ({microbatches} = "
            f"global_batch_size / (micro_batch_size x dp)) to be a multiple of "
            f"pipeline_model_parallel_size {pp}",
        )
