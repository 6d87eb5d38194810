"""Input bytes: encodings by BOM or NUL pattern, files joined with cat, bad bytes, binary sources."""

import codecs
import io
import json

import pytest

from cbgen.config import SamplingParams
from cbgen.io.encoding import sniff
from cbgen.io.reader import binary_reason, iter_lines, read_records
from cbgen.io.records import InputError, InputRecord, LineParser

LINES = [json.dumps({"custom_id": "w1", "body": {"messages": [{"role": "user", "content": "Grüße 🎉"}]}},
                    ensure_ascii=False),
         json.dumps({"id": "w2", "prompt": "日本語"}, ensure_ascii=False),
         "plain text naïve"]
ENCODINGS = {  # name -> (BOM, codec)
    "utf-8-bom": (codecs.BOM_UTF8, "utf-8"),
    "utf-16-le-bom": (codecs.BOM_UTF16_LE, "utf-16-le"), "utf-16-be-bom": (codecs.BOM_UTF16_BE, "utf-16-be"),
    "utf-32-le-bom": (codecs.BOM_UTF32_LE, "utf-32-le"), "utf-32-be-bom": (codecs.BOM_UTF32_BE, "utf-32-be"),
    "utf-16-le": (b"", "utf-16-le"), "utf-16-be": (b"", "utf-16-be"),
    "utf-32-le": (b"", "utf-32-le"), "utf-32-be": (b"", "utf-32-be")}


def encoded(name: str, lines=LINES, newline="\r\n") -> bytes:
    bom, codec = ENCODINGS[name]
    return bom + "".join(line + newline for line in lines).encode(codec)


class Trickle(io.BytesIO):
    """A stream that hands out ``k`` bytes per read, so characters and BOMs straddle reads."""

    def __init__(self, data: bytes, k: int) -> None:
        super().__init__(data)
        self.k = k

    def read1(self, n: int = -1) -> bytes:
        return super().read1(self.k)


def records(src, **kw):
    return list(read_records([str(src)], LineParser(SamplingParams(), **kw), **(
        {"stdin": src.stream} if hasattr(src, "stream") else {})))


def check(recs, source):
    assert all(isinstance(r, InputRecord) for r in recs), recs
    assert [r.id for r in recs] == ["w1", "w2", f"{source}:3"]
    assert recs[0].messages[-1]["content"] == "Grüße 🎉" and recs[1].prompt == "日本語"
    assert recs[2].messages[-1]["content"] == "plain text naïve"


@pytest.mark.parametrize("name", ENCODINGS)
def test_each_encoding_is_detected_per_file(tmp_path, name):
    f = tmp_path / f"{name}.jsonl"
    f.write_bytes(encoded(name))
    check(records(f), f.name)
    assert binary_reason(str(f)) is None


@pytest.mark.parametrize("name", ["utf-8-bom", "utf-16-le-bom", "utf-32-be-bom", "utf-16-be"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_stdin_in_any_encoding_and_any_read_size(name, k):
    recs = list(read_records(["-"], LineParser(SamplingParams()), stdin=Trickle(encoded(name), k)))
    check(recs, "stdin")


def test_utf16_powershell_file_answers_by_its_own_ids(tmp_path):
    # What Windows PowerShell `>` writes: UTF-16 LE, BOM, CRLF (cases/utf16-with-bom.jsonl).
    lines = [json.dumps({"custom_id": f"u{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 8}})
             for i in (1, 2, 3)]
    f = tmp_path / "ps.jsonl"
    f.write_bytes(encoded("utf-16-le-bom", lines))
    recs = records(f)
    assert [(type(r).__name__, r.id) for r in recs] == [("InputRecord", f"u{i}") for i in (1, 2, 3)]
    assert [r.messages[-1]["content"] for r in recs] == ["Say 1.", "Say 2.", "Say 3."]


@pytest.mark.parametrize("name", ["utf-8-bom", "utf-16-le-bom", "utf-16-be-bom"])
def test_files_joined_with_cat_keep_json_lines_json(tmp_path, name):
    a = encoded(name, ['{"id": "a1", "prompt": "x"}'], "\n")
    b = encoded(name, ['{"id": "b1", "prompt": "y"}', "second"], "\n")
    f = tmp_path / "joined.jsonl"
    f.write_bytes(a + b)  # `cat a b`: b's BOM now starts line 2
    recs = records(f)
    assert [(r.kind, r.id) for r in recs] == [("prompt", "a1"), ("prompt", "b1"), ("text", "joined.jsonl:3")]
    assert recs[2].messages[-1]["content"] == "second"


def test_invalid_bytes_name_the_line_and_byte_offset(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "\xe6\x97\xa5"}\n')
    recs = records(f)
    assert [type(r) for r in recs] == [InputRecord, InputError, InputRecord]
    assert recs[1].field == "encoding" and recs[1].id == "bad.jsonl:2"
    assert recs[1].message == "bad.jsonl line 2: invalid UTF-8: byte 0xe9 at offset 15 in the line (32 in the file)"
    # A UTF-16 file with a lone surrogate and an odd last byte.
    g = tmp_path / "bad16.txt"
    g.write_bytes(codecs.BOM_UTF16_LE + "ok\nab".encode("utf-16-le") + b"\x00\xd8" + "c\n".encode("utf-16-le")
                  + "end".encode("utf-16-le") + b"\x41")
    recs = records(g)
    assert [type(r) for r in recs] == [InputRecord, InputError, InputError]
    assert recs[1].message == ("bad16.txt line 2: invalid UTF-16 LE: byte 0x00 at offset 4 in the line "
                               "(12 in the file)")
    assert recs[2].message == ("bad16.txt line 3: invalid UTF-16 LE: byte 0x41 at offset 6 in the line "
                               "(24 in the file)")


def test_a_binary_file_is_refused_with_one_error(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # text-like first lines, NULs after
    assert binary_reason(str(f)) == ("model.bin looks binary (a NUL byte at offset 8); refusing to read it: "
                                     "expected text, JSONL or one prompt per line").replace("model.bin", str(f))
    recs = records(f)
    assert len(recs) == 1 and isinstance(recs[0], InputError) and recs[0].field == "encoding"
    assert recs[0].message.startswith("model.bin line 1: model.bin looks binary (a NUL byte at offset 8)")
    # from stdin too (the head is what the first read of the pipe brings)
    recs = list(read_records(["-"], LineParser(SamplingParams()), stdin=Trickle(f.read_bytes(), 4096)))
    assert len(recs) == 1 and "looks binary" in recs[0].message


def test_a_nul_after_the_sniffed_head_refuses_the_rest(tmp_path):
    f = tmp_path / "late.txt"
    head = "".join(f"line {i}\n" for i in range(1, 10_001)).encode()
    assert len(head) > 1 << 16
    f.write_bytes(head + b"junk\x00junk\nmore\nmore\n")
    lines = list(iter_lines([str(f)]))
    assert len(lines) == 10_001 and all(ln.problem is None for ln in lines[:-1])
    assert lines[-1].line_no == 10_001 and lines[-1].problem == (
        f"NUL byte at offset {len(head) + 4} in the file: late.txt looks binary from here on; "
        "its remaining lines are skipped")


@pytest.mark.parametrize("head, enc, bom", [
    (b"\xef\xbb\xbf{", "utf-8", 3), (b"\xff\xfe\x00\x00{\x00\x00\x00", "utf-32-le", 4),
    (b"\xff\xfe{\x00", "utf-16-le", 2), (b"{\x00\x00\x00", "utf-32-le", 0), (b"\x00\x00\x00{", "utf-32-be", 0),
    (b"\x00{\x00\"", "utf-16-be", 0), (b"x\x00", "utf-16-le", 0), (b"{}\n", "utf-8", 0)])
def test_sniff(head, enc, bom):
    s = sniff(head)
    assert (s.encoding, s.bom, s.binary_at) == (enc, bom, None)
