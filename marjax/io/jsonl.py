"""JSON and JSON Lines text parsed with errors that name the file and line (for every reader of
data files: training data, task files)."""
from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from marjax.errors import DataError

__all__ = ["parse_json", "jsonl_records"]


def parse_json(text: str, path, lineno: Optional[int] = None) -> Any:
    """json.loads(text) of a whole file `path`, or of its line `lineno`; a DataError naming the
    file and line when it is not JSON."""
    where = f"{path}:{lineno}" if lineno is not None else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = where if lineno is not None else f"{path}:{e.lineno}"
        raise DataError(f"{at}: bad JSON ({e.msg} at column {e.colno})") from e
    except (ValueError, RecursionError) as e:     # a 5000-digit number, nesting deeper than Python's stack
        raise DataError(f"{where}: unreadable JSON ({type(e).__name__}: {str(e)[:120]})") from None


def jsonl_records(text: str, path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-empty line of JSON Lines `text` read from `path`."""
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield lineno, parse_json(line, path, lineno)
