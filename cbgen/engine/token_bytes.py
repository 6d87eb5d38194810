"""Token id -> its exact bytes and text, for logprob output. No torch.

A byte-level BPE token (GPT-2, Llama 3, SmolLM, Qwen) is a string over a
256-character alphabet that stands for raw bytes, so one token may hold part of
a UTF-8 character: decoding the token alone would give U+FFFD and lose the
bytes. The bytes come from inverting that alphabet instead (``bytes_to_unicode``
in openai/gpt-2 ``src/encoder.py``, the same table as HF tokenizers'
``ByteLevel``). SentencePiece-style vocabularies (Llama 2, Mistral) use ``▁``
for a space and ``<0xNN>`` byte-fallback tokens. Added tokens (``<|im_end|>``)
are their own text.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Iterable

from .outputs import Logprob, PositionLogprobs, TokenLogprobs

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable bytes map to themselves,
    the other 68 to code points 256.."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_byte_level(tokenizer) -> bool:
    """True when the tokenizer's decoder is HF tokenizers' ByteLevel (alone or in a Sequence)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    parts = decoder.get("decoders") or [decoder]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


class TokenBytes:
    """``bytes_of(id)`` / ``text_of(id)`` for one tokenizer, cached per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self._u2b = _unicode_to_byte() if self.byte_level else {}
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._added = {i: str(getattr(t, "content", t)) for i, t in added.items()}
        self._cache: dict[int, bytes] = {}

    def bytes_of(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._bytes(token_id)
        return b

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:   # out of the tokenizer's vocabulary (a padded embedding row)
            return b""
        if self.byte_level:
            if all(c in self._u2b for c in piece):
                return bytes(self._u2b[c] for c in piece)
        else:
            m = _BYTE_FALLBACK.fullmatch(piece)
            if m:
                return bytes([int(m[1], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        # Neither mapping applies (a normal token outside the byte alphabet): its decoded text.
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def text_of(self, token_id: int) -> str:
        """The token's bytes as text; bytes of incomplete characters as ``\\xNN`` escapes."""
        return self.bytes_of(token_id).decode("utf-8", errors="backslashreplace")

    def logprob(self, token_id: int, logprob: float, rank: int | None = None) -> Logprob:
        return Logprob(token_id, self.text_of(token_id), self.bytes_of(token_id), logprob, rank)

    def position(self, e: TokenLogprobs, text_offset: int | None = None) -> PositionLogprobs:
        top = tuple(self.logprob(t, lp) for t, lp in zip(e.top_token_ids, e.top_logprobs))
        return PositionLogprobs(self.logprob(e.token_id, e.logprob, e.rank), top, text_offset)

    def positions(self, entries: Iterable[TokenLogprobs | None],
                  offsets: Iterable[int | None] | None = None) -> list[PositionLogprobs | None]:
        offs = offsets if offsets is not None else itertools.repeat(None)
        return [None if e is None else self.position(e, o) for e, o in zip(entries, offs)]
