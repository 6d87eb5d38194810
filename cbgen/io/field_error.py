"""The exception input parsers raise for one bad field, and how they quote values."""

from __future__ import annotations

import json
from typing import Any


class FieldError(ValueError):
    """A bad input field: ``field`` names it (``body.temperature``), ``what`` says
    what was expected and what came. Parsers turn it into an ``InputError``."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(what)
        self.field, self.what = field, what


def show(v: Any) -> str:
    """``v`` as JSON, cut to 40 characters, for error messages."""
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."
