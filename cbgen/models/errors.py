"""The one error type of the model wing, and how a library error becomes one line of it."""

from __future__ import annotations


class ModelError(Exception):
    """A user-facing failure to find or load a model. ``str(err)`` is one line."""


def _one_line(err: BaseException) -> str:
    name = type(err).__name__
    if name == "error":  # struct.error, zlib.error, ...: say whose
        name = f"{type(err).__module__}.error"
    text = str(err).strip().splitlines()
    return f"{name}: {text[0] if text else ''}".rstrip(": ")
