"""The run summary's line about constrained outputs that did not complete."""

from __future__ import annotations


def incomplete_warning(ids: list[str], show: int = 5) -> str:
    """One line: how many constrained outputs are incomplete, and the first ``show`` ids."""
    head = ", ".join(ids[:show]) + (f", … ({len(ids) - show} more)" if len(ids) > show else "")
    noun = "output is" if len(ids) == 1 else "outputs are"
    return (f"warning: {len(ids)} constrained {noun} incomplete (cut by max_new_tokens, a stop string or an "
            f"abort before the grammar completed; their records have structured.complete false and parsed "
            f"null): {head}")
