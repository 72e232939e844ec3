"""Nothing in the training and pruning code pins a tensor to the CPU: what computes or goes
through a collective is created on the rank's device (its GPU under NCCL, the CPU under gloo).

The scan reads the source of every module on that path and flags `device="cpu"`,
`map_location="cpu"`, `torch.device("cpu")`, `.cpu()`, `.to("cpu")`, and tensor factories called without a
`device=` (they create on the CPU whatever the rank's device is). A justified exception (a
file written to disk, host-side collation) carries `# cpu-ok: <why>` on one of its lines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "efficientllm"
# Folders are globbed recursively, so modules moved into subfolders stay covered.
SCANNED = sorted(
    {*PACKAGE.glob("training/**/*.py"), *PACKAGE.glob("pruning/**/*.py"),
     PACKAGE / "model.py", PACKAGE / "distributed.py"}
)
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "as_tensor", "from_numpy", "arange", "eye",
             "rand", "randn", "randint", "randperm", "linspace", "logspace"}
ALLOW = re.compile(r"#\s*cpu-ok:(.*)$")


def _is_cpu(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cpu")


def _problem(call: ast.Call) -> str | None:
    func = call.func
    keywords = {k.arg: k.value for k in call.keywords}
    for name in ("device", "map_location"):
        if name in keywords and _is_cpu(keywords[name]):
            return f'{name}="cpu"'
    if not isinstance(func, ast.Attribute):
        return None
    on_torch = isinstance(func.value, ast.Name) and func.value.id == "torch"
    if on_torch and func.attr == "device" and call.args and _is_cpu(call.args[0]):
        return 'torch.device("cpu")'
    if func.attr == "cpu" and not call.args:
        return ".cpu()"
    if func.attr == "to" and call.args and _is_cpu(call.args[0]):
        return '.to("cpu")'
    if on_torch and func.attr in FACTORIES and "device" not in keywords:
        return f"torch.{func.attr}(...) without device="
    return None


def violations(source: str) -> list[str]:
    """`line: what` for every CPU-bound call not marked `# cpu-ok: <why>`."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or (problem := _problem(node)) is None:
            continue
        span = lines[node.lineno - 1: node.end_lineno]
        if any(ALLOW.search(line) for line in span):
            continue
        found.append(f"{node.lineno}: {problem}: {lines[node.lineno - 1].strip()}")
    return found


def test_the_scan_covers_the_training_and_pruning_code():
    names = {p.relative_to(PACKAGE).as_posix() for p in SCANNED}
    assert {"model.py", "distributed.py", "training/trainer.py", "training/batches.py"} <= names
    assert any(n.startswith("pruning/") for n in names)


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_cpu_bound_tensor_on_the_device_path(path):
    found = violations(path.read_text())
    assert not found, f"{path.relative_to(PACKAGE)} creates tensors on the CPU (pass device=, or mark " \
                      f"'# cpu-ok: <why>'):\n" + "\n".join(found)


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_every_exception_says_why(path):
    unexplained = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                   if (m := ALLOW.search(line)) and not m.group(1).strip()]
    assert not unexplained, f"{path.relative_to(PACKAGE)}: '# cpu-ok:' without a reason:\n" + "\n".join(unexplained)


def test_the_scan_flags_each_pattern_and_honours_a_reasoned_exception():
    source = "\n".join([
        "import torch",
        "a = torch.zeros(3)",
        "b = torch.zeros(3, device=x.device)",
        "c = torch.ones(2, device='cpu')",
        "d = x.cpu()",
        "e = torch.device('cpu')",
        "f = torch.load(p, map_location='cpu')",
        "g = torch.tensor([1],",
        "                 dtype=torch.long)  # cpu-ok: an index list for the host",
        "h = torch.zeros_like(x)",
        "i = x.to('cpu', torch.float64)",
    ])
    found = [v.split(":")[0] for v in violations(source)]
    assert found == ["2", "4", "5", "6", "7", "11"], violations(source)
