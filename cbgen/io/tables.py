"""Lazy row reading from tables: Parquet, CSV / TSV and ``datasets`` directories.

Nothing reads a whole table: Parquet streams one row group at a time
(``ParquetFile.iter_batches``), CSV one block at a time (``pyarrow.csv.open_csv``),
a ``datasets`` directory (``save_to_disk``) is memory-mapped Arrow read in
slices. Rows come out as ``Row(row_no, values | problem)`` in file order;
``row_no`` is 1-based over the data rows (a CSV header is not a row).

CSV / TSV cells are read as text (``string``), never type-inferred: inference
looks at the first block only, so a later ``"n/a"`` in a number column would
stop the run. An empty unquoted cell is null; a quoted ``""`` is an empty
string. A row with the wrong number of cells is a ``problem`` row, not a crash.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, NamedTuple

TABLE_EXTS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
BATCH_ROWS = 256   # rows converted to Python at a time: bounds memory, keeps the prefetch thread responsive


class TableError(OSError):
    """A table cannot be opened or read (one line, naming the file). An ``OSError``
    so ``cbgen run`` reports it like an unreadable input file."""


class Row(NamedTuple):
    row_no: int                          # 1-based data row
    values: dict[str, Any] | None        # column -> Python value; None iff ``problem``
    problem: str | None = None           # why the row could not be read (CSV: wrong cell count)


def table_kind(path: str) -> str | None:
    """``parquet`` | ``csv`` | ``tsv`` | ``dataset`` (a ``save_to_disk`` directory), or None (a line file)."""
    if path == "-":
        return None
    if os.path.isdir(path):
        return "dataset" if any(os.path.exists(os.path.join(path, m)) for m in DATASET_MARKERS) else None
    return TABLE_EXTS.get(os.path.splitext(path)[1].lower())


def _load_dataset(path: str):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before the import: never the network
    import datasets

    datasets.disable_progress_bars()  # status on our stderr is ours
    try:
        ds = datasets.load_from_disk(path, keep_in_memory=False)
    except (FileNotFoundError, ValueError) as e:
        raise TableError(f"{path}: not a datasets directory: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise TableError(f"{path}: a DatasetDict with splits {', '.join(ds)}; give one split's directory, "
                         f"e.g. {os.path.join(path, next(iter(ds), 'train'))}")
    return ds


def _csv_options(kind: str, names: list[str] | None = None, on_bad=None):
    """Cells are read as bytes (``pa.binary``) and decoded per row in ``iter_rows``, so
    one cell that is not UTF-8 is an error for its row, not for the file."""
    import pyarrow as pa
    from pyarrow import csv

    read = csv.ReadOptions(use_threads=False, block_size=1 << 20)  # serial: bad-row numbers are known
    parse = csv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True,
                             invalid_row_handler=on_bad)
    types = {n: pa.binary() for n in names or ()}
    convert = csv.ConvertOptions(column_types=types, strings_can_be_null=True, null_values=[""],
                                 quoted_strings_can_be_null=False, check_utf8=False)
    return read, parse, convert


def _decode_cells(values: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """A CSV row's byte cells as text, or (None, why) naming the first cell that is not UTF-8."""
    out = {}
    for name, v in values.items():
        try:
            out[name] = v.decode("utf-8") if isinstance(v, bytes) else v
        except UnicodeDecodeError as e:
            return None, (f"column {name!r}: invalid UTF-8: byte 0x{v[e.start]:02x} at offset {e.start} "
                          "in the cell (expected UTF-8 text)")
    return out, None


def read_schema(path: str):
    """The ``pyarrow.Schema`` of the table at ``path`` (metadata dropped). Raises ``TableError``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import csv

    kind = table_kind(path)
    try:
        if kind == "parquet":
            schema = pq.read_schema(path)
        elif kind in ("csv", "tsv"):
            read, parse, convert = _csv_options(kind, on_bad=lambda row: "skip")  # bad rows: iter_rows
            with csv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert) as r:
                names = r.schema.names
            schema = pa.schema([(n, pa.string()) for n in names])
        elif kind == "dataset":
            schema = _load_dataset(path).data.schema
        else:
            raise TableError(f"{path}: not a table (expected .parquet, .csv, .tsv or a datasets directory)")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError) as e:
        raise TableError(f"{path}: cannot read it as {kind}: {e} (tables are read as UTF-8)") from None
    dup = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if dup:
        raise TableError(f"{path}: column {dup[0]!r} appears more than once")
    return schema.remove_metadata()


def _batches(path: str, kind: str, bad: list) -> Iterator[Any]:
    import pyarrow.parquet as pq
    from pyarrow import csv

    if kind == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
    elif kind == "dataset":
        yield from _load_dataset(path).with_format("arrow").iter(batch_size=BATCH_ROWS)
    else:
        def on_bad(row) -> str:
            # row.number counts records from 1 with the header as record 1.
            bad.append((row.number - 1, f"expected {row.expected_columns} cells, got {row.actual_columns}"))
            return "skip"
        names = read_schema(path).names
        read, parse, convert = _csv_options(kind, names, on_bad)
        with csv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert) as r:
            yield from r


def iter_rows(path: str) -> Iterator[Row]:
    """Rows of the table at ``path`` in file order, lazily. A read failure midway
    raises ``TableError`` after every row before it was delivered."""
    import pyarrow as pa

    kind = table_kind(path)
    bad: list[tuple[int, str]] = []  # CSV rows skipped by the parser: (row_no, why), in file order
    row_no = 0
    try:
        for batch in _batches(path, kind, bad):
            # Serial parsing reports a block's bad rows before the block's batch is
            # returned, so every bad row number below the next good one is known here.
            for values in batch.to_pylist():
                row_no += 1
                while bad and bad[0][0] == row_no:
                    yield Row(row_no, None, bad.pop(0)[1])
                    row_no += 1
                if kind in ("csv", "tsv"):
                    text, why = _decode_cells(values)
                    yield Row(row_no, text, why) if why is None else Row(row_no, None, why)
                else:
                    yield Row(row_no, values)
        for n, why in bad:
            yield Row(n, None, why)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise TableError(f"{path}: cannot read row {row_no + 1}: {e}") from None
