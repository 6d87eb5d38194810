"""``/set json on|off`` and ``/set schema FILE|off`` in ``cbgen chat``: the output
constraint of new prompts (``ChatSession.structured``)."""

from __future__ import annotations

from ..io.structured_fields import from_options

KEYS = ("json", "schema")


def set_structured(s, key: str, raw: str) -> str:
    """Apply ``/set json|schema RAW`` to session ``s``; returns the line to show.

    The constraint is compiled here, so a bad schema or a missing
    ``cbgen[structured]`` extra is reported now, not on the next prompt."""
    low = raw.lower()
    if not raw:
        cur = s.structured
        return f"{key}: " + ("off" if cur is None else f"{cur.kind} (from {cur.field})")
    if low in ("off", "none", "false", "no", "0"):
        s.structured = None
        return "output constraint off for new prompts"
    if key == "json" and low not in ("on", "true", "yes", "1"):
        return f"json: {raw!r} is not on or off"
    try:
        spec = from_options(json_mode=True) if key == "json" else from_options(json_schema=raw)
        s.driver.engine.grammars.compile(spec)
    except ValueError as e:
        return f"{key}: {e}"
    s.structured = spec
    return ("new prompts answer with a JSON object" if key == "json"
            else f"new prompts answer with JSON matching {raw}")
