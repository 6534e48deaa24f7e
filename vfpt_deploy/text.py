"""Text from files and artifacts made safe for a terminal or a log: every control or format character
(ESC sequences that retitle a window, clear the screen or hide text, carriage returns, bidi overrides) is
shown as its escape instead of acting. One helper for every printer. Torch-free.
"""
from __future__ import annotations

import json


def printable(v, limit: int | None = None) -> str:
    """v as one line of printable characters (structures as JSON), cut to `limit` characters."""
    s = v if isinstance(v, str) else json.dumps(v)
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s if limit is None or len(s) <= limit else s[:limit - 3] + "..."
