"""Which encoding a source's bytes are in, decided once from its first bytes, and byte offsets.

A byte-order mark wins (UTF-32 LE is tested before UTF-16 LE, whose BOM it
starts with). Without one, the NUL bytes among the first four tell UTF-16/32
from UTF-8 (RFC 4627 section 3: a JSON text starts with two ASCII characters,
so ``00 00 00 xx`` is UTF-32 BE, ``00 xx 00 xx`` UTF-16 BE, ``xx 00 00 00``
UTF-32 LE and ``xx 00 xx 00`` UTF-16 LE). Any other NUL byte means the source
is binary: text inputs never hold one.
"""

from __future__ import annotations

import codecs
import re
from typing import NamedTuple

# BOM -> codec, longest first where one BOM is a prefix of another.
BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
NAMES = {"utf-8": "UTF-8", "utf-16-le": "UTF-16 LE", "utf-16-be": "UTF-16 BE",
         "utf-32-le": "UTF-32 LE", "utf-32-be": "UTF-32 BE"}
HEAD_BYTES = 1 << 16  # what is sniffed for NUL bytes before the first line is handed out
ESCAPE = "cbgen.escape"
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(e: UnicodeError) -> tuple[str, int]:
    # Like surrogateescape, but for every byte (UTF-16/32 errors involve bytes < 0x80 too):
    # byte b -> lone surrogate U+DC00+b, which no decoder otherwise produces.
    assert isinstance(e, UnicodeDecodeError), e
    return "".join(chr(0xDC00 + b) for b in e.object[e.start:e.end]), e.end


codecs.register_error(ESCAPE, _escape)


class Sniffed(NamedTuple):
    encoding: str            # a codec name of NAMES
    bom: int                 # bytes of byte-order mark to skip
    binary_at: int | None    # offset of a NUL byte that makes the source binary


def sniff(head: bytes) -> Sniffed:
    """The encoding of a source whose first bytes are ``head`` (a few bytes up to ``HEAD_BYTES``)."""
    enc, bom = next(((enc, len(b)) for b, enc in BOMS if head.startswith(b)), (None, 0))
    if enc is None:
        enc = _by_nul_pattern(head[:4]) or "utf-8"
    if enc != "utf-8":
        return Sniffed(enc, bom, None)  # a NUL there is found after decoding (U+0000)
    nul = head.find(b"\0", bom)
    return Sniffed(enc, bom, nul if nul >= 0 else None)


def _by_nul_pattern(q: bytes) -> str | None:
    if len(q) < 2 or b"\0" not in q[:2]:
        return None
    if len(q) < 4:  # the whole source is one or two bytes short of four: "x\0" / "\0x"
        return "utf-16-le" if q[1] == 0 and q[0] != 0 else "utf-16-be" if q[0] == 0 and q[1] != 0 else None
    return {(True, True, True, False): "utf-32-be", (True, False, True, False): "utf-16-be",
            (False, True, True, True): "utf-32-le", (False, True, False, True): "utf-16-le"
            }.get(tuple(b == 0 for b in q))


def needs_more(head: bytes) -> bool:
    """Too few bytes to decide (a BOM or NUL pattern may be cut short); a UTF-8 first
    line shorter than four bytes that already ended is decided."""
    if len(head) >= 4:
        return False
    if b"\n" in head and b"\0" not in head and not any(b.startswith(head[:1]) for b, _ in BOMS):
        return False
    return True


def char_bytes(c: str, encoding: str) -> int:
    """Bytes ``c`` took in the source (an escaped bad byte took one)."""
    if "\udc00" <= c <= "\udcff":
        return 1
    if encoding == "utf-8":
        return len(c.encode("utf-8"))
    if encoding.startswith("utf-16"):
        return 4 if c > "\uffff" else 2
    return 4


def byte_length(text: str, encoding: str) -> int:
    """Bytes that ``text`` (decoded with ``ESCAPE``) took in the source."""
    if encoding == "utf-8":
        if text.isascii():  # the common case, without an encode
            return len(text)
        return len(text.encode("utf-8", "surrogateescape"))  # escapes of UTF-8 are U+DC80..U+DCFF
    try:
        return len(text.encode(encoding))
    except UnicodeEncodeError:  # escaped bytes: count them one by one
        return sum(char_bytes(c, encoding) for c in text)


def first_bad_char(text: str) -> int | None:
    """Index of the first escaped bad byte (a lone surrogate) in ``text``."""
    if text.isascii():
        return None
    m = _SURROGATE.search(text)
    return None if m is None else m.start()


def invalid_message(text: str, encoding: str, file_offset: int | None = None) -> str | None:
    """``"invalid UTF-8: byte 0xff at offset 3 in the line (12 in the file)"`` for the first
    escaped byte of ``text`` (offsets from 0), or None when ``text`` decoded cleanly."""
    i = first_bad_char(text)
    if i is None:
        return None
    at = byte_length(text[:i], encoding)
    c = ord(text[i])
    what = f"byte 0x{c & 0xFF:02x}" if 0xDC00 <= c <= 0xDCFF else f"U+{c:04X} (a lone surrogate)"
    where = "" if file_offset is None else f" ({file_offset + at} in the file)"
    return f"invalid {NAMES.get(encoding, encoding)}: {what} at offset {at} in the line{where}"
