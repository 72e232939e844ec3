"""The remote-code model written into Hugging Face exports of per-layer-width (pruned) models:
a Llama whose every layer has its own query heads, KV heads and FFN width. The two files are
copied next to config.json (`auto_map`) and loaded with `trust_remote_code=True`; they import
only transformers."""

from pathlib import Path

FILES = ("configuration_efficientllm.py", "modeling_efficientllm.py")
DIRECTORY = Path(__file__).parent
