"""The user errors of the two ends (import and export), printed by the CLI as one line."""


class ExportError(ValueError):
    """A model, tokenizer or file that cannot be written in the asked format, found before any
    output is written: the message names the layer, tensor or file and what would be valid."""


class ModelImportError(ValueError):
    """A Hugging Face model that cannot be imported (unsupported architecture, missing or
    truncated shard, shapes that disagree with its config), found before any output is
    written: the message names the field, tensor or file and what is supported."""
