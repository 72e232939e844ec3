"""The run config: typed sections, loaded from one YAML file plus `--set a.b=c` overrides.

Field names follow Megatron-LM where one exists. Defaults live here and only here; the shipped
`configs/default.yaml` is the `make run` job. Every problem is reported as one ConfigError line
naming the field and what would be valid, before any process group is formed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tempfile
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
    norm_epsilon: float = 1e-5
    # Llama 3.x RoPE scaling, as megatron-core computes it (low/high frequency factors 1 and 4,
    # original context 8192).
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    max_position_embeddings: int | None = None  # recorded for export; None: data.seq_length
    # Start from a Hugging Face model directory: its config fills every field above, its
    # weights are the initial weights and its tokenizer is data.tokenizer_model's default.
    from_hf: str | None = None
    # With from_hf: add all-zero KV groups / FFN channels where a width does not divide the
    # TP size (exact: the logits do not change; their saliency is zero).
    from_hf_pad_to_tp: bool = False
    transformer_impl: str = "local"  # local | transformer_engine
    # The spec for the continued pretraining after the last pruning event (None: unchanged).
    # Pruning runs on the local spec; `transformer_engine` rebuilds the pruned model with TE.
    transformer_impl_after_pruning: str | None = None


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
    # Also every eval_interval steps (evaluation/in_training.py): zero-shot tasks (shipped names
    # or .jsonl task files; the first eval_tasks_limit items of each, all when None) and text or
    # .jsonl files whose bits per byte is logged.
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_limit: int | None = None
    eval_text: list[str] = field(default_factory=list)
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
    # Megatron-LM's --finetune: start from `load`'s model weights with a fresh optimizer, LR
    # schedule and iteration 0; once this run has a checkpoint in `save`, that one is resumed.
    finetune: bool = False


@dataclass
class PruneConfig:
    """Pruning-aware pretraining: the budget falls linearly from the source size to the target
    between start_step and end_step, one event every `interval` steps."""

    enabled: bool = False
    target_params: int | None = None
    target_ratio: float | None = None  # fraction of the source size to keep, e.g. 0.4
    # Or prune once (start_step == end_step) to these widths: hidden_size and the uniform
    # num_attention_heads / num_query_groups / ffn_hidden_size, or `layers` (one such mapping per
    # layer); a width left out keeps the source's (pruning/targets.py).
    target_architecture: dict[str, Any] | None = None
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
    # Rank groups by what their OBS update leaves of the loss change: each score times the
    # fraction of its consumer's output error the update cannot repair (pruning/megatron/obs.py).
    score_after_compensation: bool = False
    # After a hidden removal, rescale every RMSNorm weight to keep its expected output scale
    # (pruning/norms.py); false only to measure what the correction is worth.
    hidden_rms_correction: bool = True


SALIENCY_CRITERIA = ("fisher", "taylor", "group_fisher", "activation")
SALIENCY_KINDS = ("head", "ffn", "hidden", "layer")


@dataclass
class SaliencyConfig:
    """Per-shard saliency accumulators and local Hessians (pruning/megatron/saliency.py, hessian.py).

    `criterion`: fisher = EMA of ½Σ g²w² (optimal brain damage, empirical Fisher diagonal);
    taylor = |EMA of Σ g w| for every kind; group_fisher = EMA of ½(Σ g w)² over each group (the
    empirical Fisher of a mask on the group, cross terms kept); activation = Minitron's activation
    magnitudes over the window's batches (pruning/megatron/hessian.py). `hessian_window`: batches before a pruning
    event over which the consumer matrices' H = Σ XᵀX (and activation magnitudes) are collected. `kinds`: which groups are scored ("head" also
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


def check_output_dirs(config: Config) -> None:
    """Every directory the run writes into (`run_dir`: data, metrics, TensorBoard, results;
    `checkpoint.save`) exists or can be made, and takes a new file; else one ConfigError line,
    before any work starts."""
    save = config.checkpoint.save or str(Path(config.run_dir) / "checkpoints")
    for name, path in (("run_dir", config.run_dir), ("checkpoint.save", save)):
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as err:
            raise ConfigError(f"{name} '{path}' is not writable: {err.strerror or err}") from None


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


# The range of every number field: (lowest valid, whether the lowest itself is valid, highest
# valid or None, whether that is valid). Optional fields are checked when they are set.
_RANGES: dict[str, tuple[float, bool, float | None, bool]] = {
    **{f"model.{f}": (1, True, None, False) for f in (
        "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
        "head_dim", "vocab_size", "make_vocab_size_divisible_by", "rotary_base", "max_position_embeddings")},
    "model.init_method_std": (0, False, None, False),
    "data.tokenizer_vocab_size": (1, True, None, False),
    "data.corpus_max_bytes": (1, True, None, False),
    "data.corpus_heldout_fraction": (0, False, 1, False),
    "training.seed": (0, True, None, False),
    **{f"training.{f}": (1, True, None, False) for f in (
        "global_batch_size", "log_interval", "eval_iters", "eval_tasks_limit", "exit_interval")},
    "training.eval_interval": (0, True, None, False),
    "training.lr": (0, False, None, False),
    "training.min_lr": (0, True, None, False),
    "training.weight_decay": (0, True, None, False),
    "training.adam_beta1": (0, True, 1, False),
    "training.adam_beta2": (0, True, 1, False),
    "training.adam_eps": (0, False, None, False),
    "training.clip_grad": (0, True, None, False),
    "training.exit_duration_in_mins": (0, False, None, False),
    "checkpoint.save_interval": (1, True, None, False),
    "checkpoint.keep_last": (0, True, None, False),
    **{f"prune.{f}": (1, True, None, False) for f in (
        "target_params", "min_heads_per_layer", "min_query_groups", "min_ffn_per_layer", "min_hidden")},
    "prune.damping": (0, True, None, False),
}
_LAYER_FIELDS = ("num_attention_heads", "num_query_groups", "ffn_hidden_size")


def _in_range(path: str, value: float, low: float, low_ok: bool, high: float | None, high_ok: bool) -> None:
    ok = (value >= low if low_ok else value > low) and (high is None or (value <= high if high_ok else value < high))
    ok = ok and math.isfinite(value)
    if not ok:
        lower = f"{'[' if low_ok else '('}{low}"
        upper = f"{high}{']' if high_ok else ')'}" if high is not None else "inf)"
        raise ConfigError(f"{path} must be in {lower}, {upper}, got {value}")


def _validate_ranges(config: "Config") -> None:
    """Every number within its range, and the fields with a shape (per-layer widths, split,
    per-kind maps) well formed."""
    for path, bounds in _RANGES.items():
        section, name = path.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None:
            _in_range(path, value, *bounds)
    t, pr = config.training, config.prune
    _require(t.min_lr <= t.lr, f"training.min_lr {t.min_lr} must not exceed training.lr {t.lr}")
    for i, layer in enumerate(config.model.layers or []):
        missing = [f for f in _LAYER_FIELDS if f not in layer]
        unknown = sorted(set(layer) - set(_LAYER_FIELDS))
        _require(not missing and not unknown,
                 f"model.layers[{i}] needs exactly {', '.join(_LAYER_FIELDS)}: "
                 + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"))
        for f in _LAYER_FIELDS:
            _require(isinstance(layer[f], int) and not isinstance(layer[f], bool) and layer[f] >= 1,
                     f"model.layers[{i}].{f} must be a positive integer, got {layer[f]!r}")
    parts = config.data.split.replace("/", ",").split(",")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    _require(1 <= len(weights) <= 3 and all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0,
             f"data.split {config.data.split!r} is not valid; give up to 3 non-negative train,valid,test "
             f"weights with a positive sum, e.g. '969,30,1'")
    for kind, ratio in pr.max_ratio.items():
        _in_range(f"prune.max_ratio.{kind}", ratio, 0, True, 1, True)
    for kind, weight in pr.kind_weights.items():
        _in_range(f"prune.kind_weights.{kind}", weight, 0, False, None, False)
    _require(not (pr.enabled and pr.compensation == "obs" and config.saliency.hessian_window == 0),
             "saliency.hessian_window 0 collects no Hessians, so prune.compensation=obs would compensate "
             "nothing; set saliency.hessian_window >= 1 or prune.compensation=none")
    _require(not (pr.enabled and pr.score_after_compensation and pr.compensation != "obs"),
             "prune.score_after_compensation scores what the OBS update leaves, so it needs "
             f"prune.compensation=obs (got '{pr.compensation}')")
    _require(not (config.saliency.criterion == "activation" and config.saliency.hessian_window == 0),
             "saliency.criterion=activation reads the activations of the saliency.hessian_window batches "
             "before an event; set saliency.hessian_window >= 1")


def _validate_prune(pr: PruneConfig, t: TrainingConfig, tp: int) -> None:
    """What can be checked without the model; targets against the model are checked in setup."""
    if not pr.enabled:
        return
    targets = [pr.target_params, pr.target_ratio, pr.target_architecture]
    _require(
        sum(t is not None for t in targets) == 1,
        "prune: set exactly one of prune.target_params, prune.target_ratio and prune.target_architecture",
    )
    if pr.target_architecture is not None:
        _validate_target_architecture(pr)
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


def _validate_target_architecture(pr: PruneConfig) -> None:
    """Its shape; whether the source can be pruned to it is checked against the model
    when the trainer is made (`training.pruning.target_architecture`)."""
    spec = pr.target_architecture
    _require(pr.start_step == pr.end_step,
             f"prune.target_architecture prunes once: set prune.start_step == prune.end_step "
             f"(got {pr.start_step} and {pr.end_step})")
    uniform = [f for f in _LAYER_FIELDS if f in spec]
    unknown = sorted(set(spec) - {"hidden_size", "layers", *_LAYER_FIELDS})
    _require(not unknown, f"prune.target_architecture: unknown field '{unknown[0] if unknown else ''}'; valid: "
             f"hidden_size, {', '.join(_LAYER_FIELDS)}, layers")
    _require(not (uniform and "layers" in spec),
             f"prune.target_architecture: give either layers or the uniform {', '.join(uniform)}, not both")
    widths = {f"prune.target_architecture.{f}": spec[f] for f in ("hidden_size", *uniform) if f in spec}
    layers = spec.get("layers", [])
    _require(isinstance(layers, list), f"prune.target_architecture.layers must be a list, got {layers!r}")
    for i, layer in enumerate(layers):
        _require(isinstance(layer, dict) and set(layer) == set(_LAYER_FIELDS),
                 f"prune.target_architecture.layers[{i}] needs exactly {', '.join(_LAYER_FIELDS)}, got {layer!r}")
        widths.update({f"prune.target_architecture.layers[{i}].{f}": layer[f] for f in _LAYER_FIELDS})
    for where, value in widths.items():
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{where} must be a positive integer, got {value!r}")


def _validate_training_eval(t: TrainingConfig) -> None:
    from efficientllm.evaluation import EvaluationError
    from efficientllm.evaluation.tasks import parse_task_list

    if not (t.eval_tasks or t.eval_text):
        return
    _require(t.eval_interval > 0, "training.eval_tasks and training.eval_text need training.eval_interval > 0")
    if t.eval_tasks:
        try:
            parse_task_list(",".join(t.eval_tasks))
        except EvaluationError as err:
            raise ConfigError(f"training.eval_tasks: {err}") from None


TRANSFORMER_IMPLS = ("local", "transformer_engine")


def _validate_transformer_impl(m: ModelConfig, pr: PruneConfig) -> None:
    """Pruning edits the local spec's separate norms and linears; TE fuses each norm into the
    linear after it, so TE is used only once the model stops changing shape."""
    _require(
        m.transformer_impl in TRANSFORMER_IMPLS,
        f"model.transformer_impl must be 'local' or 'transformer_engine', got '{m.transformer_impl}'",
    )
    _require(
        not (pr.enabled and m.transformer_impl == "transformer_engine"),
        "model.transformer_impl=transformer_engine cannot be used with prune.enabled (pruning edits "
        "the local spec); set model.transformer_impl=local and "
        "model.transformer_impl_after_pruning=transformer_engine to train on with TE after the last event",
    )
    after = m.transformer_impl_after_pruning
    _require(
        after is None or after in TRANSFORMER_IMPLS,
        f"model.transformer_impl_after_pruning must be unset, 'local' or 'transformer_engine', got '{after}'",
    )
    _require(
        after is None or pr.enabled,
        "model.transformer_impl_after_pruning needs prune.enabled; without pruning set model.transformer_impl",
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
    _validate_transformer_impl(m, config.prune)
    _require(m.norm_epsilon > 0, f"model.norm_epsilon must be positive, got {m.norm_epsilon}")
    _require(m.rope_scaling_factor >= 1, f"model.rope_scaling_factor must be >= 1, got {m.rope_scaling_factor}")
    _require(not m.from_hf_pad_to_tp or m.from_hf, "model.from_hf_pad_to_tp needs model.from_hf")
    _require(not config.checkpoint.finetune or config.checkpoint.load,
             "checkpoint.finetune needs checkpoint.load (the checkpoint whose weights the run starts from)")
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
    _validate_ranges(config)
    _validate_training_eval(t)
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
