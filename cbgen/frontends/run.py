"""``cbgen run``: inputs (files, stdin streams) -> engine -> JSONL as results finish.

Flow: a Prefetcher thread reads and parses lines (bounded read-ahead); this
loop admits records while fewer than ``max_in_flight`` are live, so stdin lines
join a batch that is already decoding; the Driver's engine thread steps; each
finished input is written at once (or through a bounded reorder buffer for
``--order input``). Bad lines become error records; nothing already generated
is lost. Signals only set flags; this loop acts on them (a handler must not take
the engine's lock, which this thread may be holding).
"""

from __future__ import annotations

import os
import queue
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from ..config import SamplingParams
from ..engine.engine import Engine
from ..engine.outputs import FinishReason, RequestOutput
from ..engine.structured_params import StructuredOutputsParams
from ..io.reader import Prefetcher, source_names
from ..io.records import InputError, InputRecord, LineParser
from ..io.resume import ResumeError, compact, load_done_ids
from ..io.shard import Shard
from ..io.table_rows import read_inputs
from ..io.writer import OutputClosed, ReorderBuffer, Writer, error_result, make_writer, result_from_outputs
from .backend import Backend, BackendLost, Notice, Rejected
from .driver import Driver, EngineFailed
from .interrupts import StopSignals
from .progress import ProgressView
from .structured_summary import incomplete_warning
from .table_plan import TablePlan
from .prompting import PromptError, encode


@dataclass(frozen=True)
class RunOptions:
    inputs: list[str]
    output: str | None = None          # None: stdout
    fmt: str = "jsonl"                 # jsonl | openai | text
    order: str = "finish"              # finish | input
    resume: bool = False
    system: str | None = None
    defaults: SamplingParams = field(default_factory=SamplingParams)
    progress: bool | None = None       # None: when stderr is a terminal
    quiet: bool = False
    read_ahead: int = 64
    model_name: str | None = None
    tables: TablePlan | None = None     # table options; .layout is set for a table output
    shard: Shard | None = None         # --shard I/N: only the ids of this shard
    structured: StructuredOutputsParams | None = None   # default output constraint (--json, --regex, ...)


@dataclass
class _Pending:
    record: InputRecord
    ticket: int | None
    outputs: list[RequestOutput] = field(default_factory=list)


class BatchRun:
    def __init__(self, engine: Engine | None, tokenizer, opts: RunOptions, err: Console,
                 backend: Backend | None = None) -> None:
        # backend None: a local Driver over ``engine``; else e.g. a RayPool (``engine`` unused).
        self.engine, self.tokenizer, self.opts, self.err = engine, tokenizer, opts, err
        self.backend = backend
        self.failed = 0
        self.written = 0
        self.not_started = 0
        self.incomplete: list[str] = []   # ids of constrained outputs that did not complete
        self.pending: dict[str, _Pending] = {}
        # In flight beyond the engine's slots so a freed slot is refilled at the very next step.
        self.max_in_flight = (backend.max_in_flight if backend is not None else
                              engine.config.max_num_seqs + max(8, engine.config.max_num_seqs // 4))
        self.reorder: ReorderBuffer | None = (
            ReorderBuffer(limit=self.max_in_flight + opts.read_ahead) if opts.order == "input" else None)

    # ---- output -----------------------------------------------------------
    def _emit(self, writer: Writer, rec, ticket: int | None, view: ProgressView) -> None:
        view.record_done(error=rec.finish_reason == "error")
        if rec.structured is not None and not rec.structured["complete"]:
            self.incomplete.append(rec.id)
        ready = [rec] if self.reorder is None or ticket is None else self.reorder.push(ticket, rec)
        for r in ready:
            if r is None:  # the slot of an input that never started
                continue
            writer.write(r)
            self.written += 1

    def _reject(self, writer: Writer, item, message: str, ticket: int | None, view: ProgressView) -> None:
        self.failed += 1
        self.err.print(f"[yellow]warning:[/] {message}", markup=True, highlight=False, soft_wrap=True)
        self._emit(writer, error_result(item, message if isinstance(item, InputRecord) else None,
                                        self.opts.model_name), ticket, view)

    # ---- admission ------------------------------------------------------------
    def _admit(self, items, writer: Writer, driver: Driver, view: ProgressView) -> None:
        for item in items:
            ticket = self.reorder.reserve() if self.reorder is not None else None
            if isinstance(item, InputError):
                self._reject(writer, item, item.message, ticket, view)
                continue
            try:
                ids = encode(self.tokenizer, prompt=item.prompt, messages=item.messages, controls=item.chat_controls)
                driver.submit(item.id, ids, item.params, extra={"line": item.line_no}, structured=item.structured)
            except (PromptError, ValueError) as e:
                self._reject(writer, item, f"{item.where}: {e}", ticket, view)
                continue
            self.pending[item.id] = _Pending(item, ticket)

    def _room(self) -> int:
        room = self.max_in_flight - len(self.pending)
        if self.reorder is not None and self.reorder.limit is not None:
            room = min(room, self.reorder.limit - self.reorder.outstanding)
        return max(room, 0)

    # ---- the loop ---------------------------------------------------------
    def run(self) -> int:
        opts = self.opts
        table_out = opts.tables.layout if opts.tables is not None else None
        if table_out is not None:  # pyarrow only for table outputs (start-up time)
            from ..io.table_output import TableOutput, load_table_done_ids
        try:
            done = (load_table_done_ids(opts.output) if table_out and opts.resume else
                    load_done_ids(opts.output) if opts.resume and opts.output and os.path.exists(opts.output)
                    else None)
        except ResumeError as e:
            self.err.print(f"error: {e}", highlight=False, soft_wrap=True)
            return 2
        if done is not None and done.done_ids:
            self.err.print(f"resume: {len(done.done_ids)} ids already in {opts.output}, skipping them",
                           highlight=False)
        parser = LineParser(opts.defaults, system=opts.system, skip_ids=done.done_ids if done else (),
                            sources=source_names(opts.inputs), shard=opts.shard, structured=opts.structured)
        prefetch = Prefetcher(read_inputs(opts.inputs, parser, opts.tables and opts.tables.spec),
                              maxsize=opts.read_ahead)
        try:   # the CLI checked the path before loading; this is what changed since
            out_cm = (TableOutput(opts.output, opts.fmt, table_out, opts.inputs, resume=opts.resume,
                                  part_rows=opts.tables.part_rows) if table_out else
                      open(opts.output, "a" if opts.resume else "w", encoding="utf-8")
                      if opts.output else nullcontext(sys.stdout))
        except OSError as e:
            self.err.print(f"error: --output {opts.output!r}: {e.strerror or e}", highlight=False, soft_wrap=True)
            return 2
        show = opts.progress if opts.progress is not None else (self.err.is_terminal and not opts.quiet)
        view = self.backend.progress_view() if self.backend is not None else ProgressView(self.engine)
        driver = self.backend if self.backend is not None else Driver(self.engine)
        input_done = read_failed = False
        with out_cm as stream, StopSignals() as sig, driver:
            writer = make_writer(opts.fmt, stream)
            # --progress on a stderr that is not a terminal: Rich would draw nothing there, so the
            # view gets a console that writes its frames anyway (for `script`, `less -R`, logs).
            console = self.err if self.err.is_terminal else Console(file=self.err.file, force_terminal=True)
            live = Live(view.render(), console=console, refresh_per_second=8, transient=True) if show else nullcontext()
            try:
                with live:
                    while True:
                        if sig.stop_admitting and sig.announced == 0:
                            sig.announced = 1
                            prefetch.close()
                            self.err.print(f"stopping: no new inputs; finishing the {len(self.pending)} submitted, running or queued "
                                           "(Ctrl-C again to abort them)", highlight=False)
                        if sig.abort and sig.announced < 2:
                            sig.announced = 2
                            self.err.print("aborting: writing partial results", highlight=False)
                            driver.abort_all()
                        if not sig.stop_admitting and not input_done and self._room():
                            # Block briefly on input only when the engine has nothing to do.
                            wait = 0.1 if not self.pending else 0
                            try:
                                self._admit(prefetch.get_many(self._room(), timeout=wait), writer, driver, view)
                            except OSError as e:
                                self.err.print(f"error: cannot read input: {e}", highlight=False)
                                self.failed += 1
                                input_done = read_failed = True
                            input_done = input_done or prefetch.exhausted
                        if input_done and view.total is None:
                            view.total = view.done + len(self.pending)
                        view.queued_outside = prefetch.waiting
                        if not self.pending and (input_done or sig.stop_admitting):
                            break
                        self._drain(driver, writer, view, timeout=0.02 if not input_done else 0.1)
                        if show:
                            live.update(view.render())
            except OutputClosed:
                driver.abort_all()
                prefetch.close()
                # Python's final flush would report the broken pipe again.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                return 0
            except BackendLost as e:
                # Written records stay; in-flight ones get none, so --resume redoes them.
                self.err.print(f"[bold red]error:[/] {escape(str(e))}; {len(self.pending)} inputs in flight have no record "
                               "(run again with --resume to finish the job)", highlight=False, soft_wrap=True)
                self.failed += 1
                self.pending.clear()
                read_failed = True   # not complete: a table output keeps its parts for --resume
            finally:
                prefetch.close()
            if self.reorder is not None:
                for r in self.reorder.drain():
                    if r is not None:
                        writer.write(r)
            writer.close(complete=input_done and not read_failed and not sig.stop_admitting)
        if table_out is None and done is not None and done.superseded:  # closed: leave one record per id
            with StopSignals():  # Ctrl-C / SIGTERM wait for the rewrite (atomic anyway: SIGKILL loses nothing)
                dropped = compact(opts.output)
            self.err.print(f"resume: {opts.output} rewritten with one record per id "
                           f"({dropped} superseded partial or repeated records dropped)", highlight=False)
        if self.not_started:
            self.err.print(f"{self.not_started} inputs never started; no record was written for them "
                           "(run again with --resume to do them)", highlight=False)
        if not opts.quiet:
            self.err.print(view.summary(), highlight=False)
            if self.incomplete:
                self.err.print(incomplete_warning(self.incomplete), highlight=False, soft_wrap=True)
        # Interrupted before the job was whole (input left unread, inputs never started, or
        # running ones aborted): 130, the shell's code for SIGINT, so a script can tell.
        if sig.abort or (sig.stop_admitting and not input_done) or self.not_started:
            return 130
        return 1 if self.failed else 0

    def _drain(self, driver: Driver, writer: Writer, view: ProgressView, timeout: float) -> None:
        try:
            first = driver.events.get(timeout=timeout)
        except queue.Empty:
            return
        events = [first]
        while True:
            try:
                events.append(driver.events.get_nowait())
            except queue.Empty:
                break
        for ev in events:
            if isinstance(ev, EngineFailed):
                raise ev.error
            if isinstance(ev, Notice):
                self.err.print(f"[yellow]warning:[/] {escape(ev.message)}", highlight=False, soft_wrap=True)
                continue
            if isinstance(ev, Rejected):
                p = self.pending.pop(ev.request_id)
                self._reject(writer, p.record, f"{p.record.where}: {ev.message}", p.ticket, view)
                continue
            view.observe(ev)
            if not ev.finished:
                continue
            p = self.pending[ev.request_id]
            p.outputs.append(ev)
            if len(p.outputs) < ev.num_samples:
                continue
            del self.pending[ev.request_id]
            # Never started (every sample aborted before its first step): no record, so
            # `--resume` runs it later. One started sample is enough for a partial record.
            if all(o.finish_reason is FinishReason.ABORT and o.metrics.first_scheduled_time is None
                   for o in p.outputs):
                self.not_started += 1
                if self.reorder is not None and p.ticket is not None:
                    for r in self.reorder.push(p.ticket, None):
                        if r is not None:
                            writer.write(r)
                continue
            self._emit(writer, result_from_outputs(p.record, p.outputs, self.opts.model_name), p.ticket, view)
