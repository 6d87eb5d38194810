"""Table inputs without a model: templates, lazy readers (Parquet, CSV/TSV, datasets dirs), rows -> records."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cbgen.config import SamplingParams
from cbgen.io.records import InputError, InputRecord, LineParser
from cbgen.io.table_rows import TableRow, TableSpec, TableSpecError, read_inputs
from cbgen.io.tables import TableError, iter_rows, read_schema, table_kind
from cbgen.io.templates import PromptTemplate, TemplateError, TemplateRowError

# ---- templates ----------------------------------------------------------------


def test_template_kind_is_detected_and_columns_listed():
    py = PromptTemplate("Summarize: {text} ({n:>3d}) {meta[k]}")
    assert py.kind == "python" and py.columns == ("text", "n", "meta")
    assert py.render({"text": "hi", "n": 7, "meta": {"k": "v"}}) == "Summarize: hi (  7) v"
    jj = PromptTemplate("{% if lang %}[{{ lang }}] {% endif %}{{ text | upper }}")
    assert jj.kind == "jinja" and set(jj.columns) == {"lang", "text"}
    assert jj.render({"lang": "fr", "text": "hi"}) == "[fr] HI"
    # A literal brace in a Python template needs the explicit kind.
    lit = PromptTemplate('JSON like {{"a": 1}} for {text}', "python")
    assert lit.columns == ("text",) and lit.render({"text": "x"}) == 'JSON like {"a": 1} for x'


@pytest.mark.parametrize("text, kind, match", [
    ("{} and {0}", "auto", "has no column name"),
    ("a } b", "auto", "Single '}'"),
    ("{{ text ", "auto", "template line 1"),
    ("{text}", "mustache", "expected one of auto, python, jinja"),
])
def test_bad_templates_are_refused_up_front(text, kind, match):
    with pytest.raises(TemplateError, match=match):
        PromptTemplate(text, kind)


def test_row_render_errors_name_the_placeholder():
    t = PromptTemplate("{text} {n:d}")
    with pytest.raises(TemplateRowError, match=r"placeholder \{n:d\}: Unknown format code 'd'") as e:
        t.render({"text": "a", "n": "seven"})
    assert e.value.field == "n"
    with pytest.raises(TemplateRowError, match="column 'text' is null"):
        t.render({"text": None, "n": 1})
    with pytest.raises(TemplateRowError, match="ZeroDivisionError"):
        PromptTemplate("{{ n / 0 }}").render({"n": 1})


# ---- readers --------------------------------------------------------------------


def _parquet(tmp_path, name="t.parquet", rows=10, group=4):
    t = pa.table({"id": [f"r{i}" for i in range(rows)], "text": [f"text {i}" for i in range(rows)],
                  "n": pa.array(range(rows), pa.int32())})
    path = str(tmp_path / name)
    pq.write_table(t, path, row_group_size=group)
    return path


def test_parquet_rows_stream_in_order_across_row_groups(tmp_path):
    path = _parquet(tmp_path, rows=10, group=3)
    assert table_kind(path) == "parquet" and read_schema(path).field("n").type == pa.int32()
    rows = list(iter_rows(path))
    assert [r.row_no for r in rows] == list(range(1, 11))
    assert rows[9].values == {"id": "r9", "text": "text 9", "n": 9}


def test_parquet_is_read_lazily(tmp_path, monkeypatch):
    from cbgen.io import tables
    pulled = []
    real = tables._batches

    def counting(*a):
        for b in real(*a):
            pulled.append(b.num_rows)
            yield b
    monkeypatch.setattr(tables, "BATCH_ROWS", 2)
    monkeypatch.setattr(tables, "_batches", counting)
    it = iter_rows(_parquet(tmp_path, rows=50, group=10))
    assert [next(it).row_no for _ in range(3)] == [1, 2, 3]
    assert pulled == [2, 2]  # two batches of 2 rows, not the table
    assert len(list(it)) == 47 and sum(pulled) == 50


def test_csv_cells_are_text_and_bad_rows_keep_their_numbers(tmp_path, monkeypatch):
    from cbgen.io import tables
    p = tmp_path / "t.csv"
    body = ['id,text,n', '1,hello,3', '2,too few', '3,"multi\nline, with comma",5', '4,x,y,z', '5,,""']
    body += [f"{i},row {i},{i}" for i in range(6, 400)]
    body.insert(300, "bad")
    p.write_text("\n".join(body) + "\n", encoding="utf-8")
    monkeypatch.setattr(tables, "_csv_options", _small_blocks(tables._csv_options))
    rows = list(iter_rows(str(p)))
    assert [r.row_no for r in rows] == list(range(1, 401))
    assert rows[0].values == {"id": "1", "text": "hello", "n": "3"}  # text, not inferred ints
    assert rows[1].problem == "expected 3 cells, got 2" and rows[3].problem == "expected 3 cells, got 4"
    assert rows[2].values["text"] == "multi\nline, with comma"
    assert rows[4].values == {"id": "5", "text": None, "n": ""}  # empty: null; quoted "": empty string
    assert rows[299].problem == "expected 3 cells, got 1"
    assert rows[300].values["id"] == "300" and rows[-1].values["id"] == "399"


def _small_blocks(real):
    """``_csv_options`` with 256-byte blocks, so bad rows fall in several blocks."""
    def opts(*a, **kw):
        read, parse, convert = real(*a, **kw)
        read.block_size = 256
        return read, parse, convert
    return opts


def test_tsv_and_errors(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("id\ttext\na\tone, two\n", encoding="utf-8")
    assert [r.values for r in iter_rows(str(p))] == [{"id": "a", "text": "one, two"}]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(TableError, match="bad.parquet: cannot read it as parquet"):
        read_schema(str(bad))
    dup = tmp_path / "dup.csv"
    dup.write_text("a,a\n1,2\n")
    with pytest.raises(TableError, match="column 'a' appears more than once"):
        read_schema(str(dup))


def test_datasets_directory_is_read_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    ds.select([2, 0]).save_to_disk(str(tmp_path / "ds"))  # an indices mapping, flattened on save
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    path = str(tmp_path / "ds")
    assert table_kind(path) == "dataset" and read_schema(path).names == ["text", "label"]
    assert [r.values for r in iter_rows(path)] == [{"text": "c", "label": 0}, {"text": "a", "label": 0}]
    with pytest.raises(TableError, match="DatasetDict with splits train; give one split's directory"):
        read_schema(str(tmp_path / "dd"))
    assert table_kind(str(tmp_path)) is None


# ---- rows -> records ----------------------------------------------------------------


def _items(sources, spec, **kw):
    return list(read_inputs(sources, LineParser(SamplingParams(max_new_tokens=5), **kw), spec))


def test_template_rows_become_chat_records_with_their_row(tmp_path):
    path = _parquet(tmp_path, rows=3)
    items = _items([path], TableSpec(PromptTemplate("Say {text}"), id_column="id"), system="Be brief.")
    assert [i.id for i in items] == ["r0", "r1", "r2"] and [i.line_no for i in items] == [1, 2, 3]
    rec = items[1]
    assert isinstance(rec, InputRecord) and rec.kind == "text" and rec.params.max_new_tokens == 5
    assert rec.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say text 1"}]
    assert rec.extra["row"] == TableRow("t.parquet", {"id": "r1", "text": "text 1", "n": 1})


def test_prompt_and_messages_columns(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    t = pa.table({"prompt": ["Once", None], "messages": [chat, chat], "json": [json.dumps(chat), "[oops"]})
    path = str(tmp_path / "c.parquet")
    pq.write_table(t, path)
    raw = _items([path], TableSpec(prompt_column="prompt"))
    assert raw[0].kind == "prompt" and raw[0].prompt == "Once" and raw[0].messages is None
    assert isinstance(raw[1], InputError) and raw[1].message == "c.parquet row 2: column 'prompt': expected a string, got null"
    # Default: the messages column (a list of structs), then --system is added.
    msgs = _items([path], TableSpec(), system="S")
    assert msgs[0].kind == "messages" and msgs[0].messages == [{"role": "system", "content": "S"}, *chat]
    js = _items([path], TableSpec(messages_column="json"))
    assert js[0].messages == chat
    assert isinstance(js[1], InputError) and js[1].message.startswith("c.parquet row 2: column 'json': invalid JSON")


def test_bad_rows_are_error_items_and_keep_their_cells(tmp_path):
    t = pa.table({"id": ["a", None, "a", "d"], "text": ["x", "y", "z", None]})
    path = str(tmp_path / "t.parquet")
    pq.write_table(t, path)
    items = _items([path], TableSpec(PromptTemplate("{text}"), id_column="id"))
    assert isinstance(items[0], InputRecord)
    assert items[1].message == "t.parquet row 2: column 'id': expected a non-empty string or an integer, got null"
    assert items[1].id == "t.parquet:2"
    assert items[2].message == "t.parquet row 3: field 'id': duplicate id \"a\" (first on t.parquet row 1)"
    assert items[3].message == "t.parquet row 4: column 'text' is null" and items[3].id == "d"
    assert items[3].extra["row"].columns == {"id": "d", "text": None}


def test_spec_checks_columns_up_front():
    with pytest.raises(TableSpecError, match=r"t.csv: --template placeholder 'txt': no such column \(columns: id, text\)"):
        TableSpec(PromptTemplate("{txt}")).resolve("t.csv", ["id", "text"])
    with pytest.raises(TableSpecError, match="--id-column 'key': no such column"):
        TableSpec(prompt_column="text", id_column="key").resolve("t.csv", ["id", "text"])
    with pytest.raises(TableSpecError, match="no prompt: give --template, --prompt-column or --messages-column"):
        TableSpec().resolve("t.csv", ["id", "text"])
    with pytest.raises(TableSpecError, match="--template and --prompt-column: give only one"):
        TableSpec(PromptTemplate("{a}"), prompt_column="a")
    assert TableSpec().resolve("t", ["prompt", "x"]).prompt_column == "prompt"


def test_mixed_sources_resume_skips_and_prefix_ids(tmp_path):
    path = _parquet(tmp_path, rows=3)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("hello\nworld\n")
    items = _items([str(jsonl), path], TableSpec(PromptTemplate("{text}")), skip_ids={"t.parquet:2"})
    assert [i.id for i in items] == ["a.jsonl:1", "a.jsonl:2", "t.parquet:1", "t.parquet:3"]   # base names
    assert items[0].extra["row"] == TableRow("a.jsonl", {})
    assert items[3].extra["row"].source == "t.parquet"


def test_csv_cell_that_is_not_utf8_is_an_error_for_its_row_only(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,n\ncaf\xe9,1\nok,2\n")
    rows = list(iter_rows(str(path)))
    assert rows[0].values is None and rows[0].problem == \
        "column 'text': invalid UTF-8: byte 0xe9 at offset 3 in the cell (expected UTF-8 text)"
    assert rows[1] == (2, {"text": "ok", "n": "2"}, None)
