"""What ``BatchRun`` needs from an engine backend, and the events only remote backends send.

Two backends satisfy it: the local ``Driver`` (one engine on a thread) and
``RayPool`` (N engines in Ray actors). ``BatchRun`` talks to either through

* ``submit(request_id, prompt_token_ids, params, extra)`` — queue a request;
* ``abort(request_id)`` / ``abort_all()`` — cancel; each cancelled request still
  ends with a finished ``RequestOutput`` whose ``finish_reason`` is ``abort``
  (``metrics.first_scheduled_time is None`` when it never started);
* ``events`` — a ``queue.Queue`` of ``RequestOutput``, ``EngineFailed``,
  ``Rejected`` and ``Notice``;
* the context manager (``__enter__`` starts, ``__exit__`` stops and frees).

Contract: every submitted request ends in exactly one of: its final outputs
(one finished ``RequestOutput`` per sample), a ``Rejected``, or an
``EngineFailed`` that stops the run.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import SamplingParams


@dataclass(frozen=True)
class Rejected:
    """A remote engine refused a request (``Engine.add_request``'s ValueError, naming the field)."""
    request_id: str
    message: str


@dataclass(frozen=True)
class Notice:
    """A warning for the user (e.g. a worker died and its requests were re-queued); the run goes on."""
    message: str


class BackendLost(RuntimeError):
    """Every engine is gone (all Ray workers died). Records already written stay
    valid; the requests still in flight have no record, so ``--resume`` redoes them."""


class Backend(Protocol):
    events: "queue.Queue[Any]"

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               extra: dict[str, Any] | None = None, structured=None) -> None: ...

    def abort(self, request_id: str) -> bool: ...

    def abort_all(self) -> None: ...

    def __enter__(self) -> "Backend": ...

    def __exit__(self, *exc) -> None: ...
