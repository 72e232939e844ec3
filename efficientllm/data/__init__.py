"""Data: the default corpus, the tokenizer, `.bin/.idx` preprocessing and megatron GPT datasets.

Nothing is imported here so that `from efficientllm.data import DataError` stays cheap (the
dataset modules import megatron-core).
"""


class DataError(ValueError):
    """Data input that cannot be used: a missing or corrupt file, a bad blend, a vocab mismatch.

    The message is one line naming the file or field and what would be valid.
    """
