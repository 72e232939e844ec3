"""The real-scale example configs (not run here) load, and their layout fits the documented launch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from efficientllm.config import CONFIG_DIR, load_config
from tests.distributed.launch import REPO

EXAMPLES = sorted((CONFIG_DIR / "examples").glob("*.yaml"))


def documented_ranks(path) -> int:
    match = re.search(r"^# ranks: (\d+)", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} does not document its launch as '# ranks: N (...)'"
    return int(match.group(1))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads_and_its_layout_divides_the_documented_world(path):
    world = documented_ranks(path)
    load_config(path).validate(world)
    # The check the launch scripts run before any rank starts.
    out = subprocess.run([sys.executable, str(REPO / "launch/resolve_config.py"), str(path), str(world)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"layout: world {world} = ")


def test_469m_example_prunes_over_the_papers_token_budget():
    config = load_config(CONFIG_DIR / "examples/smollm-1.7b-to-469m-8x8.yaml")
    t, prune = config.training, config.prune
    tokens = t.train_iters * t.global_batch_size * config.data.seq_length
    assert abs(tokens - 8.6e9) / 8.6e9 < 0.01
    assert prune.enabled and prune.target_params == 469_000_000 and prune.interval == 1
    assert (prune.end_step - prune.start_step) * t.global_batch_size * config.data.seq_length == tokens


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_builds_its_source_model_and_prunes_on_the_local_spec(path):
    from efficientllm.architecture import architecture_from_config

    config = load_config(path)
    arch = architecture_from_config(config, config.model.vocab_size)
    arch.validate(config.parallel.tensor_model_parallel_size)
    documented = re.search(r"~([\d.]+)([MB]) parameters\)", path.read_text())
    assert documented, f"{path.name} does not document its source size as '~N.NB parameters)'"
    size = float(documented.group(1)) * (1e9 if documented.group(2) == "B" else 1e6)
    assert abs(arch.num_parameters() - size) / size < 0.01
    # Transformer Engine fuses the norms that pruning edits: only after the last event.
    assert config.prune.enabled and config.model.transformer_impl == "local"
    assert config.model.transformer_impl_after_pruning in (None, "transformer_engine")
