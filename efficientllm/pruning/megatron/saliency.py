"""Per-shard saliency accumulators: a few floats per group, updated from the gradient the
training step already computed (megatron DDP's DP-reduced `main_grad`), no extra forward or
backward and no copy of the model.

Per step, for every group g this rank holds a part of:

- fisher: ½ Σ_{i∈g} g_i² w_i²  (optimal brain damage with the empirical Fisher diagonal)
- taylor: Σ_{i∈g} g_i w_i       (the signed first-order loss change of removing g)
- group_fisher: ½ (Σ_{i∈g} g_i w_i)²  (the empirical Fisher of a mask on g: the second-order
  loss change of removing the whole group with its cross terms, which the diagonal drops)

The three are in the same unit for every kind (a loss change), but the diagonal of a group of n
parameters misses its n² − n cross terms, and kinds differ in n and in how coherent their
gradients are: on the tiny source the diagonal priced a middle layer's FFN channel ~26,000× below
its measured loss change, layer 0's ~3,800× and a hidden channel ~900× (docs/RESULTS.md). The
group Fisher keeps the cross terms. A hidden channel's group spans every layer and stage, so its
per-step sum is completed over the model-parallel group (`hidden_sum`, one all-reduce of [h] per
step) before it is squared; every other group lives on one TP rank.

A hidden channel's sums run over its matrix columns and rows only, not over the RMSNorm weights
in front of its consumers. Such a weight only scales the consumer columns it feeds: per step
γ_i·∂L/∂γ_i = Σ_j W_ji·∂L/∂W_ji, its Taylor term is the consumer column's and its Fisher term the
square of that column's summed g·w. Counting it counts the same removal again, as a whole
column's coherent second-order term charged to one parameter; on the tiny source that was 54% of
a hidden channel's score, so hidden channels looked far dearer per parameter than heads and FFN
channels (whose scores have no such term) and were never pruned (docs/RESULTS.md).

Both are computed per matrix with vectorised reductions of P = G ⊙ W (row / column sums of P
and P², then gathered into group bins with the index views of `groups.py`) and folded into an
exponential moving average (the first update initialises it). The taylor score of every kind is
the same quantity, |EMA Σ g w|: the signed sums are averaged and the absolute value is taken at
decision time (`sync.global_score_table`), after a hidden channel's partial sums from every TP
rank and PP stage are added up — taking |·| per step would need a collective every step.

Layer score: EMA of the mean over tokens of 1 − cos(x_in, x_out) of each block (ShortGPT /
Minitron), from forward hooks during training forwards only. Under `criterion: activation` only
the layer score is accumulated here; the other kinds are scored from the window's activations
(`hessian.py`).

A step is folded in two halves: `observe()` after the schedule ran (gradients reduced over DP)
and before `optimizer.step()`, then `commit()` if the optimizer applied the step or `discard()`
if it skipped it (found inf/nan), so a non-finite gradient never enters the averages. `update()`
does both. Nothing here calls a collective but `hidden_sum` (group_fisher only): under
megatron's distributed optimizer with DP > 1 the caller first completes the reduce-scattered
gradients (`sync.complete_reduce_scattered_grads`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from efficientllm.architecture import Architecture
from efficientllm.config import SaliencyConfig
from efficientllm.pruning.layout import kept_hidden
from efficientllm.pruning.megatron.groups import LocalLayer, ShardGroups, shard_groups
from efficientllm.pruning.plan import Plan

_STAT_DTYPE = torch.float64  # accumulators are tiny; fp64 keeps layouts within round-off
_GROUP_STATS = ("fisher", "taylor", "group_fisher")
_GROUP_KINDS = ("kv_group", "head", "ffn")  # the prefixes of the per-layer statistics' keys


def _kind_of(key: str) -> str:
    return next(kind for kind in _GROUP_KINDS if key.startswith(kind + "_"))


def _grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer will use: megatron DDP's main_grad, else .grad."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def _products(param: torch.nn.Parameter) -> torch.Tensor | None:
    grad = _grad(param)
    if grad is None:
        return None
    return grad.float() * param.detach().float()


def _fold_hidden(hidden_f: torch.Tensor, hidden_t: torch.Tensor, products: torch.Tensor, dim: int) -> None:
    """Add one matrix's per-hidden-channel Fisher (half the summed squares) and Taylor sums."""
    f, t = _sums(products, dim)
    hidden_f.add_(f, alpha=0.5)
    hidden_t.add_(t)


def _sums(p: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ p², Σ p) reduced over `dim`, in the accumulators' dtype."""
    return (p * p).sum(dim, dtype=_STAT_DTYPE), p.sum(dim, dtype=_STAT_DTYPE)


class SaliencyAccumulator:
    """EMA saliency statistics of every group on this rank (see the module docstring).

    `stats[layer]` (global 0-based layer) holds, per local group in global order:
    {head,kv_group,ffn}_{fisher,taylor,group_fisher} (taylor signed) and `cos` (a 0-d tensor);
    `hidden_fisher` / `hidden_taylor` are [h] partial sums, `hidden_group_fisher` the complete
    [h] scores (accumulated only under `criterion: group_fisher`).

    `hidden_sum` completes a [h] vector of per-step partial sums over the model-parallel group
    (`sync.sum_over_model_parallel`); the default, identity, is right for one model-parallel rank."""

    def __init__(self, model: list[torch.nn.Module], arch: Architecture, config: SaliencyConfig | None = None,
                 hidden_sum: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.config = config or SaliencyConfig(enabled=True)
        self.hidden_sum = hidden_sum or (lambda partial: partial)
        self.kinds = set(self.config.kinds)
        self.steps = 0
        self._hooks: list[Any] = []
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (EMA, this step's value)
        self._bind(model, arch)
        self._reset_stats()

    # ----- setup -------------------------------------------------------------------------
    def _bind(self, model, arch: Architecture) -> None:
        self.model = model
        self.groups: ShardGroups = shard_groups(model, arch)
        self.arch = arch
        self._cos_sum: dict[int, torch.Tensor] = {}
        self._cos_count: dict[int, int] = {}
        if "layer" in self.kinds:
            for local in self.groups.layers:
                self._hooks.append(
                    local.module.register_forward_hook(self._layer_hook(local.layer), with_kwargs=True)
                )

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=_STAT_DTYPE, device=self.groups.layers[0].qkv.device)

    def _reset_stats(self) -> None:
        self.steps = 0
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        for l in self.groups.layers:
            nh, ng, nf = len(l.global_heads), len(l.global_kv_groups), len(l.global_ffn)
            sizes = {"head": nh, "kv_group": ng, "ffn": nf}
            self.stats[l.layer] = {f"{kind}_{stat}": self._zeros(n) for kind, n in sizes.items() for stat in _GROUP_STATS}
            self.stats[l.layer]["cos"] = self._zeros(1)[0]
        h = self.arch.hidden_size
        self.hidden_fisher = self._zeros(h)
        self.hidden_taylor = self._zeros(h)
        self.hidden_group_fisher = self._zeros(h)

    def _layer_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            if not module.training:
                return
            x_in = kwargs.get("hidden_states", args[0] if args else None)
            x_out = output[0] if isinstance(output, tuple) else output
            if x_in is None or x_out is None:
                return
            with torch.no_grad():
                cos = F.cosine_similarity(x_in.detach().float(), x_out.detach().float(), dim=-1)
                self._cos_sum[layer] = self._cos_sum.get(layer, 0.0) + (1.0 - cos).sum(dtype=_STAT_DTYPE)
                self._cos_count[layer] = self._cos_count.get(layer, 0) + cos.numel()

        return hook

    def remove(self) -> None:
        """Remove the forward hooks (statistics are kept)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ----- one step ----------------------------------------------------------------------
    def _queue(self, stat: torch.Tensor, value: torch.Tensor) -> None:
        """Queue this step's value of one statistic; `commit()` folds it in."""
        self._pending.append((stat, value))

    def update(self) -> None:
        """`observe()` and `commit()`: for a step the optimizer is known to apply."""
        self.observe()
        self.commit()

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the observed step into the EMAs (the first step initialises them)."""
        beta = self.config.ema_beta if self.steps > 0 else 0.0
        for stat, value in self._pending:
            stat.mul_(beta).add_(value, alpha=1.0 - beta)
        self._pending = []
        self.steps += 1

    def discard(self) -> None:
        """Forget the observed step (the optimizer skipped it: its gradients are not finite)."""
        self._pending = []

    @torch.no_grad()
    def observe(self) -> None:
        """Compute this step's per-group values from the DP-reduced gradients (before the
        optimizer step changes the weights); nothing is folded in until `commit()`."""
        self._pending = []
        # Under the activation criterion the window's activations score the groups, not gradients.
        kinds = set() if self.config.criterion == "activation" else self.kinds
        want_hidden = "hidden" in kinds
        want_heads, want_ffn = "head" in kinds, "ffn" in kinds
        hidden_f = self._zeros(self.arch.hidden_size) if want_hidden else None
        hidden_t = self._zeros(self.arch.hidden_size) if want_hidden else None
        for local in self.groups.layers:
            s = self.stats[local.layer]
            if want_heads or want_hidden:
                self._attention(local, s, hidden_f, hidden_t, want_heads)
            if want_ffn or want_hidden:
                self._mlp(local, s, hidden_f, hidden_t, want_ffn)
            if local.layer in self._cos_count:
                count = self._cos_count.pop(local.layer)
                self._queue(s["cos"], self._cos_sum.pop(local.layer) / count)
        if want_hidden:
            for touch in self.groups.stem:
                p = _products(touch.param)
                if p is not None:
                    _fold_hidden(hidden_f, hidden_t, p, touch.dim)
            self._queue(self.hidden_fisher, hidden_f)
            self._queue(self.hidden_taylor, hidden_t)
            if self.config.criterion == "group_fisher":
                self._queue(self.hidden_group_fisher, 0.5 * self.hidden_sum(hidden_t.clone()).square())

    def _attention(self, local: LocalLayer, s, hidden_f, hidden_t, want_heads: bool) -> None:
        qkv, proj = _products(local.qkv), _products(local.proj)
        if qkv is None or proj is None:
            return
        if want_heads:
            rows_f, rows_t = _sums(qkv, 1)
            cols_f, cols_t = _sums(proj, 0)
            head_f = rows_f[local.head_qkv_rows].sum(1) + cols_f[local.head_proj_cols].sum(1)
            head_t = rows_t[local.head_qkv_rows].sum(1) + cols_t[local.head_proj_cols].sum(1)
            kv_t = rows_t[local.kv_qkv_rows].sum(1)
            self._queue(s["head_fisher"], 0.5 * head_f)
            self._queue(s["head_taylor"], head_t)
            self._queue(s["head_group_fisher"], 0.5 * head_t.square())
            self._queue(s["kv_group_fisher"], 0.5 * rows_f[local.kv_qkv_rows].sum(1))
            self._queue(s["kv_group_taylor"], kv_t)
            self._queue(s["kv_group_group_fisher"], 0.5 * kv_t.square())
        if hidden_f is not None:
            for p, dim in ((qkv, 0), (proj, 1)):
                _fold_hidden(hidden_f, hidden_t, p, dim)

    def _mlp(self, local: LocalLayer, s, hidden_f, hidden_t, want_ffn: bool) -> None:
        fc1, fc2 = _products(local.fc1), _products(local.fc2)
        if fc1 is None or fc2 is None:
            return
        if want_ffn:
            rows_f, rows_t = _sums(fc1, 1)
            cols_f, cols_t = _sums(fc2, 0)
            ffn_t = rows_t[local.ffn_fc1_rows].sum(1) + cols_t[local.ffn_fc2_cols]
            self._queue(s["ffn_fisher"], 0.5 * (rows_f[local.ffn_fc1_rows].sum(1) + cols_f[local.ffn_fc2_cols]))
            self._queue(s["ffn_taylor"], ffn_t)
            self._queue(s["ffn_group_fisher"], 0.5 * ffn_t.square())
        if hidden_f is not None:
            for p, dim in ((fc1, 0), (fc2, 1)):
                _fold_hidden(hidden_f, hidden_t, p, dim)

    # ----- checkpoint state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's statistics, keyed by global layer (restore at the same TP/PP layout)."""
        return {
            "steps": self.steps,
            "tp": (self.groups.tp_rank, self.groups.tp_size),
            "layers": {l: {k: v.clone() for k, v in s.items()} for l, s in self.stats.items()},
            "hidden_fisher": self.hidden_fisher.clone(),
            "hidden_taylor": self.hidden_taylor.clone(),
            "hidden_group_fisher": self.hidden_group_fisher.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["tp"]) != (self.groups.tp_rank, self.groups.tp_size) or set(state["layers"]) != set(self.stats):
            raise ValueError(
                f"saliency state was saved at TP rank/size {tuple(state['tp'])} for layers "
                f"{sorted(state['layers'])}; this rank is {(self.groups.tp_rank, self.groups.tp_size)} "
                f"with layers {sorted(self.stats)} (reset the accumulators to resume at another layout)"
            )
        for l, s in state["layers"].items():
            for k, v in s.items():  # a state saved before a statistic existed leaves it at zero
                if v.shape != self.stats[l][k].shape:
                    raise ValueError(f"saliency state: layer {l} {k} has shape {tuple(v.shape)}, expected {tuple(self.stats[l][k].shape)}")
                self.stats[l][k].copy_(v)
        self.hidden_fisher.copy_(state["hidden_fisher"])
        self.hidden_taylor.copy_(state["hidden_taylor"])
        if "hidden_group_fisher" in state:
            self.hidden_group_fisher.copy_(state["hidden_group_fisher"])
        self.steps = int(state["steps"])

    # ----- after a pruning event ---------------------------------------------------------
    def reindex(self, plan: Plan, old_arch: Architecture, model) -> None:
        """Keep the statistics of the surviving groups, re-bound to the pruned `model` (whose
        Architecture is `plan.apply(old_arch)`). Layers are renumbered past removed ones."""
        new_arch = plan.apply(old_arch)
        removed_layers = set(plan.layers)
        kept: dict[int, dict[str, torch.Tensor]] = {}
        for local in self.groups.layers:
            l = local.layer
            if l in removed_layers:
                continue
            s, lay, heads = self.stats[l], local.layout, plan.removed_heads(l)
            gone_heads, gone_groups = set(heads), set(lay.removed_groups(heads))
            gone_ffn = set(plan.removed_ffn(l))
            keep = {
                "head": [i for i, k in enumerate(local.global_heads) if k not in gone_heads],
                "kv_group": [i for i, g in enumerate(local.global_kv_groups) if g not in gone_groups],
                "ffn": [i for i, c in enumerate(local.global_ffn) if c not in gone_ffn],
            }
            new_l = l - sum(1 for r in removed_layers if r < l)
            kept[new_l] = {
                k: (v if k == "cos" else v[torch.tensor(keep[_kind_of(k)], dtype=torch.long, device=v.device)])
                for k, v in s.items()
            }
        hidden = kept_hidden(old_arch, plan.hidden).to(self.hidden_fisher.device)
        hidden_f, hidden_t, steps = self.hidden_fisher[hidden], self.hidden_taylor[hidden], self.steps
        hidden_g = self.hidden_group_fisher[hidden]
        self.remove()
        self._bind(model, new_arch)
        self._reset_stats()
        if set(kept) != set(self.stats) or any(
            kept[l][k].shape != self.stats[l][k].shape for l in kept for k in kept[l]
        ):
            return  # the shards moved (uneven per-rank removal): start the statistics afresh
        self.stats, self.hidden_fisher, self.hidden_taylor, self.steps = kept, hidden_f, hidden_t, steps
        self.hidden_group_fisher = hidden_g

    def reset(self) -> None:
        self._reset_stats()
        self._cos_sum.clear()
        self._cos_count.clear()

