"""The common tail of every benchmark: print the figures (JSON, then one summary line), write the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmdpd_pl.files import atomic_write


def report(result: dict[str, Any], summary: str, out: Path) -> None:
    """Print ``result`` as JSON and the ``summary`` line, write the JSON to ``out``, print its path last."""
    text = json.dumps(result, indent=2)
    print(text)
    print(summary)
    print(atomic_write(out, text.encode()))
