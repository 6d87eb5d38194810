"""``cbgen merge``: shard outputs -> one output, with its checks reported on stderr."""

from __future__ import annotations

import os
import sys
import tempfile

from rich.console import Console
from rich.markup import escape

from ..io.merge import MergeError, merge_outputs

SHOW = 10  # ids named per problem before "... and N more"


def _names(ids) -> str:
    ids = list(ids)
    more = f" ... and {len(ids) - SHOW} more" if len(ids) > SHOW else ""
    return escape(", ".join(ids[:SHOW]) + more)


def run_merge(outputs: list[str], output: str | None, inputs: list[str] | None, err: Console) -> int:
    """Exit code: 0 when every id is there exactly once, 1 when not (the merge is written anyway), 2 on error."""
    for p in [*outputs, *(inputs or [])]:
        if not os.path.isfile(p):
            err.print(f"[bold red]error:[/] {escape(repr(p))}: no such file", highlight=False)
            return 2
    try:
        if output is None:
            report = merge_outputs(outputs, sys.stdout.buffer, inputs)
            sys.stdout.buffer.flush()
        else:
            # Written beside the target and renamed, so a failed merge never leaves half a file.
            fd, tmp = tempfile.mkstemp(prefix=".merge-", dir=os.path.dirname(os.path.abspath(output)))
            try:
                with os.fdopen(fd, "wb") as f:
                    report = merge_outputs(outputs, f, inputs)
                os.replace(tmp, output)
            except BaseException:
                os.unlink(tmp)
                raise
    except (MergeError, OSError) as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    for note in report.incomplete:
        err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if report.duplicates:
        dup = [f"{rid} ({n}x)" for rid, n in report.duplicates.items()]
        err.print(f"[red]duplicate ids[/] ({len(dup)}, first kept): {_names(dup)}", highlight=False, soft_wrap=True)
    if report.missing:
        err.print(f"[red]missing ids[/] ({len(report.missing)}): {_names(report.missing)}",
                  highlight=False, soft_wrap=True)
    if report.unexpected:
        err.print(f"[red]ids not in the inputs[/] ({len(report.unexpected)}): {_names(report.unexpected)}",
                  highlight=False, soft_wrap=True)
    check = "every input id exactly once" if report.checked_missing else "no duplicate ids (give --input to check for missing ones)"
    status = check if report.ok else "problems above"
    err.print(f"merge: {report.records} records from {len(outputs)} files; {status}", highlight=False, soft_wrap=True)
    return 0 if report.ok else 1
