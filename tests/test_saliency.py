"""Saliency accumulators and local Hessians on a real megatron-core GPT model, one rank."""

from __future__ import annotations

import hashlib

import pytest
import torch

from efficientllm.architecture import Architecture
from efficientllm.config import ParallelConfig, SaliencyConfig, TrainingConfig
from efficientllm.model import ModelOptions, build_model_chunks
from efficientllm.pruning.megatron.groups import GroupId, shard_groups
from efficientllm.pruning.megatron.hessian import HessianCollector
from efficientllm.pruning.megatron.saliency import SaliencyAccumulator
from efficientllm.pruning.megatron.sync import global_score_table, reduce_window_over_dp
from efficientllm.pruning.plan import Plan

SEQ, MBS, MICRO = 16, 2, 2


def tiny_arch() -> Architecture:
    # Heterogeneous on purpose: per-layer widths and GQA with 3 heads per group in layer 1.
    return Architecture.from_dict({
        "hidden_size": 32, "vocab_size": 64, "head_dim": 8, "tie_embeddings": False,
        "layers": [
            {"num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 48},
            {"num_attention_heads": 6, "num_query_groups": 2, "ffn_hidden_size": 40},
        ],
    })


def build(arch: Architecture):
    from efficientllm.training.optimizer import build_optimizer, wrap_ddp

    chunks = build_model_chunks(arch, ModelOptions(seq_length=SEQ))
    model = wrap_ddp(chunks, ParallelConfig())
    training = TrainingConfig(lr=1e-2, lr_warmup_iters=0, train_iters=10, global_batch_size=MBS * MICRO)
    optimizer, _ = build_optimizer(model, training, ParallelConfig())
    return model, optimizer


def batches(step: int, vocab: int):
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(MICRO):
        tokens = torch.randint(0, vocab, (MBS, SEQ + 1), generator=g)
        out.append({
            "tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "position_ids": torch.arange(SEQ).expand(MBS, SEQ), "loss_mask": torch.ones(MBS, SEQ),
        })
    return out


def train_step(model, optimizer, step: int, vocab: int, before_step=None) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from efficientllm.training.trainer import _forward_step

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(batches(step, vocab)), model=model[0],
        num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    if before_step is not None:
        before_step()
    optimizer.step()
    return torch.stack([l["lm loss"] for l in losses]).mean().item()


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model[0].named_parameters():
        h.update(name.encode() + p.detach().numpy().tobytes())
    return h.hexdigest()


# ----- brute force from the full weights and gradients (independent index arithmetic) -----


def brute_force(model, arch: Architecture, criterion: str) -> dict:
    gpt = model[0].module
    d, h = arch.head_dim, arch.hidden_size
    p = lambda param: (param.main_grad.double() * param.detach().double())
    if criterion == "fisher":
        score = lambda x: 0.5 * (x ** 2).sum().item()
    elif criterion == "taylor":
        score = lambda x: abs(x.sum().item())
    elif criterion == "group_fisher":
        score = lambda x: 0.5 * x.sum().item() ** 2
    else:  # "signed": the first-order term before its absolute value
        score = lambda x: x.sum().item()
    table = {"head": [], "kv_group": [], "ffn": []}
    hidden_parts: list[list[torch.Tensor]] = [[] for _ in range(h)]
    for l, block in enumerate(gpt.decoder.layers):
        w = arch.layers[l]
        hpg = w.heads_per_group
        qkv, proj = p(block.self_attention.linear_qkv.weight), p(block.self_attention.linear_proj.weight)
        fc1, fc2 = p(block.mlp.linear_fc1.weight), p(block.mlp.linear_fc2.weight)
        heads, kvs, ffn = [], [], []
        for head in range(w.num_attention_heads):
            g, j = divmod(head, hpg)
            q0 = g * (hpg + 2) * d + j * d
            heads.append(score(torch.cat([qkv[q0:q0 + d].flatten(), proj[:, head * d:(head + 1) * d].flatten()])))
        for g in range(w.num_query_groups):
            k0 = g * (hpg + 2) * d + hpg * d
            kvs.append(score(qkv[k0:k0 + 2 * d].flatten()))
        f = w.ffn_hidden_size
        for c in range(f):
            ffn.append(score(torch.cat([fc1[c], fc1[f + c], fc2[:, c]])))
        table["head"].append(torch.tensor(heads, dtype=torch.float64))
        table["kv_group"].append(torch.tensor(kvs, dtype=torch.float64))
        table["ffn"].append(torch.tensor(ffn, dtype=torch.float64))
        for i in range(h):  # the norm weights in front of qkv / fc1 are not counted (saliency.py)
            hidden_parts[i] += [qkv[:, i], fc1[:, i], proj[i], fc2[i]]
    stem = (p(gpt.embedding.word_embeddings.weight), p(gpt.output_layer.weight))
    for i in range(h):
        hidden_parts[i] += [stem[0][:, i], stem[1][:, i]]
    table["hidden"] = torch.tensor([score(torch.cat(parts)) for parts in hidden_parts], dtype=torch.float64)
    return table


def assert_tables_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    for kind in b:
        xs, ys = (a[kind], b[kind]) if kind in ("hidden", "layer") else (torch.cat(a[kind]), torch.cat(b[kind]))
        torch.testing.assert_close(xs, ys, rtol=rtol, atol=rtol * ys.abs().max().item(), msg=kind)


@pytest.mark.parametrize("criterion", ["fisher", "taylor", "group_fisher"])
def test_each_group_score_equals_the_brute_force_sum_over_the_full_weights(single_rank, criterion):
    arch = tiny_arch()
    model, optimizer = build(arch)
    acc = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True, criterion=criterion, ema_beta=0.0))
    expected = {}

    def before_step():
        acc.update()
        expected.update(brute_force(model, arch, criterion))

    train_step(model, optimizer, 0, arch.vocab_size, before_step)
    table = global_score_table(acc)
    assert_tables_close(table, expected)
    assert set(table) == {"head", "kv_group", "ffn", "hidden", "layer"}
    assert all((s > 0).all() for s in table["head"])


def test_a_norm_weights_taylor_term_is_its_consumer_columns_so_hidden_scores_leave_it_out(single_rank):
    # Why the hidden sums skip the RMSNorm weights: gamma_i * dL/dgamma_i equals the summed
    # W_ji * dL/dW_ji of the column it scales, so counting it would count that column twice.
    arch = tiny_arch()
    model, optimizer = build(arch)
    pairs = []

    def before_step():
        gpt = model[0].module
        p = lambda param: param.main_grad.double() * param.detach().double()
        for block in gpt.decoder.layers:
            pairs.append((p(block.input_layernorm.weight), p(block.self_attention.linear_qkv.weight).sum(0)))
            pairs.append((p(block.pre_mlp_layernorm.weight), p(block.mlp.linear_fc1.weight).sum(0)))
        pairs.append((p(gpt.decoder.final_layernorm.weight), p(gpt.output_layer.weight).sum(0)))

    train_step(model, optimizer, 0, arch.vocab_size, before_step)
    assert len(pairs) == 2 * arch.num_layers + 1
    for norm, column in pairs:
        assert norm.abs().max() > 0
        torch.testing.assert_close(norm, column, rtol=1e-4, atol=1e-4 * column.abs().max().item())


def test_scores_are_an_exponential_moving_average_over_steps(single_rank):
    arch = tiny_arch()
    model, optimizer = build(arch)
    beta = 0.75
    acc = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True, ema_beta=beta))
    per_step = []
    for step in range(3):
        train_step(model, optimizer, step, arch.vocab_size,
                   lambda: (acc.update(), per_step.append(brute_force(model, arch, "fisher"))))
    ema = per_step[0]["hidden"]
    for s in per_step[1:]:
        ema = beta * ema + (1 - beta) * s["hidden"]
    torch.testing.assert_close(global_score_table(acc)["hidden"], ema, rtol=1e-5, atol=0)


def _kinds(table: dict) -> dict[str, torch.Tensor]:
    return {k: table[k] if k == "hidden" else torch.cat(table[k]) for k in ("head", "kv_group", "ffn", "hidden")}


def _two_steps(criterion: str, beta: float) -> tuple[dict, list[dict]]:
    """The score table after two steps at `beta`, and each step's signed group sums (brute force)."""
    arch = tiny_arch()
    model, optimizer = build(arch)
    acc = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True, criterion=criterion, ema_beta=beta))
    signed = []
    for step in range(2):
        train_step(model, optimizer, step, arch.vocab_size,
                   lambda: (acc.update(), signed.append(_kinds(brute_force(model, arch, "signed")))))
    return _kinds(global_score_table(acc)), signed


def test_group_fisher_averages_the_squared_group_sum_not_the_square_of_its_average(single_rank):
    # The mask's Fisher is E[(dL/dm)^2]: a group whose gradient sum flips sign between steps
    # keeps its second moment, where the square of the averaged (Taylor) sum cancels.
    beta = 0.5
    table, signed = _two_steps("group_fisher", beta)
    for kind in table:
        first, second = signed[0][kind], signed[1][kind]
        expected = 0.5 * (beta * first ** 2 + (1 - beta) * second ** 2)
        torch.testing.assert_close(table[kind], expected, rtol=1e-5, atol=1e-5 * expected.max().item(), msg=kind)
        square_of_average = 0.5 * (beta * first + (1 - beta) * second) ** 2
        assert (table[kind] >= square_of_average * (1 - 1e-6)).all(), kind
        if kind in ("head", "ffn", "hidden"):
            assert not torch.allclose(table[kind], square_of_average, rtol=1e-3), kind


def test_taylor_is_one_definition_for_every_kind_the_absolute_value_of_the_averaged_sum(single_rank):
    beta = 0.5
    table, signed = _two_steps("taylor", beta)
    for kind in table:
        first, second = signed[0][kind], signed[1][kind]
        expected = (beta * first + (1 - beta) * second).abs()
        torch.testing.assert_close(table[kind], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=kind)
        # the sign flipped for some groups: an average of absolute values would differ there
        flipped = (first * second < 0) & ((first.abs() - second.abs()).abs() > 0.1 * first.abs())
        if kind in ("head", "ffn", "hidden"):
            assert flipped.any(), kind
            average_of_abs = beta * first.abs() + (1 - beta) * second.abs()
            assert not torch.allclose(table[kind][flipped], average_of_abs[flipped], rtol=1e-3)


def test_layer_score_is_one_minus_cosine_of_block_input_and_output(single_rank):
    arch = tiny_arch()
    model, optimizer = build(arch)
    acc = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True, ema_beta=0.0))
    seen: dict[int, list[float]] = {0: [], 1: []}

    def probe(l):
        def hook(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            cos = torch.nn.functional.cosine_similarity(x.double(), output[0].double(), dim=-1)
            seen[l].append((1 - cos).mean().item())
        return hook

    handles = [b.register_forward_hook(probe(l), with_kwargs=True) for l, b in enumerate(model[0].module.decoder.layers)]
    train_step(model, optimizer, 0, arch.vocab_size, acc.update)
    for handle in handles:
        handle.remove()
    expected = torch.tensor([sum(v) / len(v) for v in seen.values()], dtype=torch.float64)
    torch.testing.assert_close(global_score_table(acc)["layer"], expected, rtol=1e-5, atol=1e-7)


def test_accumulators_and_hessian_hooks_leave_training_bit_identical(single_rank):
    arch = tiny_arch()
    model, optimizer = build(arch)
    base = [train_step(model, optimizer, s, arch.vocab_size) for s in range(3)]
    base_digest = digest(model)

    model, optimizer = build(arch)
    acc = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True))
    hessians = HessianCollector(model, arch)
    hessians.open_window()
    losses = [train_step(model, optimizer, s, arch.vocab_size, acc.update) for s in range(3)]
    assert losses == base
    assert digest(model) == base_digest
    assert acc.steps == 3 and hessians.tokens[(0, "linear_fc2")] == 3 * MICRO * MBS * SEQ


def test_hooks_can_be_removed(single_rank):
    arch = tiny_arch()
    model, optimizer = build(arch)
    acc = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True))
    hessians = HessianCollector(model, arch)
    hessians.open_window()
    hooked = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model[0].modules())
    assert hooked() > 0
    acc.remove()
    hessians.close_window()
    assert hooked() == 0
    train_step(model, optimizer, 0, arch.vocab_size)
    assert hessians.hessians == {} and acc._cos_count == {}


def test_hessian_is_the_sum_of_input_outer_products_and_only_in_the_window(single_rank):
    arch = tiny_arch()
    model, optimizer = build(arch)
    hessians = HessianCollector(model, arch)
    inputs: list[torch.Tensor] = []
    fc2 = model[0].module.decoder.layers[1].mlp.linear_fc2
    handle = fc2.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    train_step(model, optimizer, 0, arch.vocab_size)  # window closed: nothing collected
    assert hessians.hessians == {}
    inputs.clear()
    hessians.open_window()
    train_step(model, optimizer, 1, arch.vocab_size)
    hessians.close_window()
    handle.remove()
    x = torch.cat(inputs).double()
    reduce_window_over_dp(hessians)
    torch.testing.assert_close(hessians.hessians[(1, "linear_fc2")].double(), x.T @ x, rtol=1e-5, atol=1e-4)
    assert set(hessians.hessians) == {(l, m) for l in (0, 1) for m in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")} | {(None, "output_layer")}


def test_groups_have_global_identities_and_sizes(single_rank):
    arch = tiny_arch()
    model, _ = build(arch)
    groups = shard_groups(model, arch)
    assert groups.ids("head")[-1] == GroupId("head", 1, 5)
    assert len(groups.ids("ffn")) == 48 + 40 and len(groups.ids("kv_group")) == 4
    assert groups.sizes().head == 2 * arch.head_dim * arch.hidden_size
    assert {t.name for t in groups.stem} == {"embedding", "output_layer"}


def test_state_round_trips_and_reindex_keeps_the_surviving_groups(single_rank):
    arch = tiny_arch()
    model, optimizer = build(arch)
    acc = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True))
    train_step(model, optimizer, 0, arch.vocab_size, acc.update)
    state = acc.state_dict()
    other = SaliencyAccumulator(model, arch, SaliencyConfig(enabled=True))
    other.load_state_dict(state)
    assert_tables_close(global_score_table(other), global_score_table(acc), rtol=0)

    before = global_score_table(acc)
    plan = Plan(heads={1: [1, 4]}, ffn={0: [3, 7]}, hidden=[5])
    pruned_arch = plan.apply(arch)
    pruned, _ = build(pruned_arch)
    acc.reindex(plan, arch, pruned)
    after = global_score_table(acc)
    keep_heads = [k for k in range(6) if k not in (1, 4)]
    torch.testing.assert_close(after["head"][1], before["head"][1][keep_heads])
    torch.testing.assert_close(after["ffn"][0], before["ffn"][0][[c for c in range(48) if c not in (3, 7)]])
    torch.testing.assert_close(after["hidden"], before["hidden"][[i for i in range(32) if i != 5]])
    assert acc.steps == 1
