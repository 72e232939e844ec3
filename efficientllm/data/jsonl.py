"""JSON Lines input (documents, task files, a run's metrics): one JSON value a line, blank lines
skipped, and any bad line named by file and line number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from efficientllm.data import DataError


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """("file:line", value) for every non-blank line; invalid JSON or non-UTF-8 text is a DataError."""
    try:
        with open(path, encoding="utf-8") as stream:
            for number, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: invalid JSON ({err.msg}); expected one object per line") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
