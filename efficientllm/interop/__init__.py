"""The two ends: Hugging Face checkpoints in (import) and out (export), GGUF out for llama.cpp.

Every exporter reads an `ExportSource` (source.py): one model as full, unsharded tensors under
Hugging Face Llama names, whatever TP/PP it was trained at.
"""
