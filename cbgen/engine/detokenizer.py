"""Incremental detokenisation and stop strings. No torch.

Text is decoded from a sliding window of tokens (vLLM's prefix/read offsets),
so each step costs O(window), not O(length). A delta is held back while it
ends in an incomplete UTF-8 character, and while its tail could still be the
start of a stop string, so streamed text never shows what the final text drops.
A character cut short at the end of a generation is dropped, not shown as U+FFFD.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class Detokenizer:
    tokenizer: object
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    token_ids: list[int] = field(default_factory=list)
    text: str = ""           # decoded so far (before any stop cut)
    emitted: int = 0         # chars of `text` already handed out
    prefix_offset: int = 0
    read_offset: int = 0
    # Per token added: len(text) before it, i.e. where its text starts. Non-decreasing;
    # a token holding part of a character gets the offset where that character starts.
    offsets: list[int] = field(default_factory=list)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int], find_stop: bool = True) -> str | None:
        """Append tokens; returns the stop string if one now occurs in the text. ``find_stop``
        False (``min_new_tokens`` not reached): the new text is not searched, and later searches
        start near their own new text, so a stop string inside it never ends the output (vLLM's
        min_tokens: stop strings are only checked once the output is that long)."""
        self.token_ids.extend(new_ids)
        self.offsets.extend([len(self.text)] * len(new_ids))
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            old_len = len(self.text)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return self._find_stop(old_len) if find_stop else None
        return None

    def _find_stop(self, old_len: int) -> str | None:
        if not self.stop:
            return None
        best = None
        for s in self.stop:
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s) if self.include_stop else i]
        return s

    def num_tokens_in(self, text_len: int) -> int:
        """How many of the tokens added so far have text in ``text[:text_len]``: a
        token that starts at or after that cut (a trailing EOS or other special
        token, a token wholly inside a removed stop string) does not."""
        return bisect.bisect_left(self.offsets, text_len)

    def delta(self, finished: bool) -> str:
        """Text not handed out yet; while running, a possible stop prefix is held back."""
        end = len(self.text)
        if not finished and self.stop:
            hold = max(len(s) for s in self.stop) - 1
            end = max(self.emitted, end - hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def finish_text(self) -> str | None:
        """At a non-stop finish, flush what the window still holds; returns a stop
        string if the flushed text completes one (the text is cut there).

        The window is held back only while its decode ends in U+FFFD, so what it
        holds ends in one: the replacement for the bytes of a character the last
        tokens left incomplete (``max_new_tokens`` or an abort cut it). That one
        U+FFFD is dropped from the text; the tokens still count. A lossy UTF-8
        decode (Python's, and HF tokenizers' ``from_utf8_lossy``) replaces an
        incomplete but valid prefix by exactly one U+FFFD, so earlier ones
        (bytes that were invalid, not cut short) stay.
        """
        tail = self._decode(self.token_ids[self.prefix_offset:])
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        if len(tail) > len(prefix):
            old_len = len(self.text)
            self.text += tail[len(prefix):].removesuffix("\ufffd")
            self.read_offset = len(self.token_ids)
            self.prefix_offset = self.read_offset
            return self._find_stop(old_len)
        return None
