"""Reading the JSON files the harness loads from disk (case files, matrix summaries, the corpus index).

Torch-free, so report rendering can use it.  The caller names its own error type and wording.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def read_json(path: Path, error: type[Exception], *, label: str, kind: str = "",
              max_bytes: Optional[int] = None) -> Any:
    """``json.loads`` of ``path``, raising ``error`` with a message that starts with ``label``.

    ``max_bytes``: refuse a larger file ("... is larger than N bytes; not <kind>") before reading it.
    """
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise error(f"{label} is larger than {max_bytes} bytes; not {kind}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{label} is not valid JSON: {e}") from None
