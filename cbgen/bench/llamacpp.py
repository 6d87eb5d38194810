"""llama.cpp as a bench system: ``llama-server`` fed the workload over HTTP, ``llama-bench`` for batch-1 decode.

Binaries come from ``$CBGEN_LLAMACPP_BIN`` or ``~/.cache/cbgen-bench/llama.cpp/build/bin`` (built by
``../shared/bench/build_llamacpp.sh``); when one is missing the bench skips that system with a note.
The server gets the workload's own token ids (chat template already applied by cbgen), so both sides
see the same tokens. HTTP is the standard library only. No torch.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .measure import RequestTiming, RunResult, now
from .workloads import Workload

DEFAULT_BIN = "~/.cache/cbgen-bench/llama.cpp/build/bin"
BUILD_HINT = "build it with ../shared/bench/build_llamacpp.sh or set CBGEN_LLAMACPP_BIN"
HTTP_TIMEOUT_S = 600.0        # one request, a whole long generation behind a queue of others
START_TIMEOUT_S = 180.0       # model load + the server's own warm-up decode


class LlamaCppError(RuntimeError):
    """A llama.cpp binary failed (its exit code and the tail of its log in the message)."""


def bin_dir() -> Path:
    return Path(os.environ.get("CBGEN_LLAMACPP_BIN") or DEFAULT_BIN).expanduser()


def find_tool(name: str) -> Path | None:
    """``bin_dir()/name`` if it is an executable file, else None."""
    p = bin_dir() / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def missing_note(tool: str) -> str:
    return f"{tool}: skipped: no {tool} in {bin_dir()} ({BUILD_HINT})"


# ---- llama-bench -------------------------------------------------------------------------

@dataclass(frozen=True)
class LlamaBenchResult:
    """Batch-1 decode of one GGUF: ``llama-bench -p 0 -n n_gen`` averaged over ``repetitions``."""
    gguf: str                 # file name
    model_type: str           # llama-bench's, e.g. "llama 256M Q4_1"
    n_gen: int
    repetitions: int
    threads: int
    ms_per_token: float       # mean over repetitions of (run time / n_gen)
    ms_per_token_stddev: float
    samples_ms_per_token: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return 1000.0 / self.ms_per_token


def parse_llama_bench(text: str) -> list[LlamaBenchResult]:
    """The decode tests (``n_prompt == 0``, ``n_gen > 0``) of ``llama-bench -o json`` output.

    llama-bench reports nanoseconds per run of ``n_gen`` tokens (``avg_ns``, ``stddev_ns``,
    ``samples_ns``); here they become ms per token. Raises ValueError on anything else.
    """
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"llama-bench output is not JSON: {e}") from None
    if not isinstance(rows, list):
        raise ValueError("llama-bench output is not a JSON list of tests")
    out = []
    for r in rows:
        n = r.get("n_gen", 0)
        if r.get("n_prompt", 0) != 0 or n <= 0:
            continue
        samples = [s / n / 1e6 for s in r.get("samples_ns", [])]
        out.append(LlamaBenchResult(Path(r["model_filename"]).name, r.get("model_type", ""), n,
                                    len(samples) or 1, r["n_threads"], r["avg_ns"] / n / 1e6,
                                    r.get("stddev_ns", 0) / n / 1e6, samples))
    if not out:
        raise ValueError("llama-bench output holds no decode test (n_prompt 0, n_gen > 0)")
    return out


def run_llama_bench(gguf: Path, threads: int, n_gen: int = 128, repetitions: int = 3) -> LlamaBenchResult:
    """``llama-bench -m GGUF -n n_gen -p 0 -t threads -r repetitions -o json``; LlamaCppError if it fails."""
    exe = find_tool("llama-bench")
    if exe is None:
        raise LlamaCppError(missing_note("llama-bench"))
    cmd = [str(exe), "-m", str(gguf), "-n", str(n_gen), "-p", "0", "-t", str(threads),
           "-r", str(repetitions), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LlamaCppError(f"llama-bench exited {proc.returncode}: {_tail(proc.stderr)}")
    return parse_llama_bench(proc.stdout)[0]


# ---- llama-server: lifecycle --------------------------------------------------------------

def free_port() -> int:
    """A port the OS just handed out (closed again: a small race with other processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 5) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


@dataclass(frozen=True)
class ServerSpec:
    gguf: Path
    parallel: int             # -np: slots, i.e. sequences decoded together
    ctx: int                  # -c: the whole KV cache; each slot gets ctx / parallel tokens
    threads: int


class LlamaServer:
    """``llama-server`` as a context manager: started on a free port, ready once ``/health`` is 200,
    and always stopped on exit (exceptions and Ctrl-C included; atexit as a last resort).

    Its log goes to a temp file whose tail is quoted when it fails to start.
    """

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.start_s: float | None = None      # launch to healthy

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LlamaServer":
        exe = find_tool("llama-server")
        if exe is None:
            raise LlamaCppError(missing_note("llama-server"))
        s = self.spec
        self.port = free_port()
        self._log = tempfile.TemporaryFile(mode="w+", prefix="llama-server-")
        cmd = [str(exe), "-m", str(s.gguf), "-np", str(s.parallel), "-c", str(s.ctx), "-t", str(s.threads),
               "--host", "127.0.0.1", "--port", str(self.port)]
        t0 = now()
        # Own session: a Ctrl-C at the terminal reaches only the bench, which then stops the server.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.start_s = now() - t0
        return self

    def _wait_healthy(self) -> None:
        deadline = now() + START_TIMEOUT_S
        while now() < deadline:
            if self.proc.poll() is not None:
                raise LlamaCppError(f"llama-server exited {self.proc.returncode} at start: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass   # not listening yet, or 503 while the model loads
            time.sleep(0.1)
        raise LlamaCppError(f"llama-server not healthy after {START_TIMEOUT_S:.0f} s: {self._log_tail()}")

    def usage(self) -> tuple[float | None, float | None, float]:
        """(RSS MB, peak RSS MB so far (Linux VmHWM, else None), CPU s of all its threads) of the server."""
        import psutil
        p = psutil.Process(self.proc.pid)
        cpu = p.cpu_times()
        peak = None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                peak = next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
        return p.memory_info().rss / 2**20, peak, cpu.user + cpu.system

    def _log_tail(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return _tail(self._log.read())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; idempotent."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        atexit.unregister(self.stop)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- llama-server: client -----------------------------------------------------------------

@dataclass
class Completion:
    """One ``/completion`` answer. Times are ``now()`` stamps (seconds); ``first_token_at`` is
    None when no token came."""
    token_ids: list[int]
    tokens_predicted: int     # the server's n_decoded
    stop_type: str            # "eos" | "limit" | "word" | ...
    timings: dict             # the server's own: prompt_n, prompt_ms, predicted_n, predicted_ms, ...
    first_token_at: float | None = None
    finished_at: float | None = None


def completion_body(prompt: list[int], wl: Workload) -> dict:
    """Greedy, ``max_new_tokens``, EOS rule of ``wl``; token ids in and out, streamed."""
    return {"prompt": prompt, "n_predict": wl.max_new_tokens, "temperature": 0.0,
            "ignore_eos": wl.ignore_eos, "return_tokens": True, "stream": True}


def parse_event(line: bytes | str) -> dict | None:
    """One server-sent-events line of a streamed ``/completion``: its JSON, or None for blank lines."""
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    return json.loads(line[5:])


def error_message(obj: dict) -> str:
    """One line from llama-server's error JSON, ``{"error": {"code", "message", "type"}}``."""
    e = obj.get("error")
    if isinstance(e, dict):
        return f"llama-server: {e.get('message')} (HTTP {e.get('code')}, {e.get('type')})"
    return f"llama-server: {e!r}"


def collect_stream(lines, clock=now) -> Completion:
    """Fold the events of one streamed ``/completion`` into a Completion (tokens from every event,
    counts and timings from the final ``stop: true`` event). ``clock`` stamps the first token and
    the end. LlamaCppError for an error event; ValueError if the stream never ends."""
    ids: list[int] = []
    first = None
    for line in lines:
        ev = parse_event(line)
        if ev is None:
            continue
        if "error" in ev:   # a failure after the stream started comes as an event
            raise LlamaCppError(error_message(ev))
        if ev.get("tokens"):
            if first is None:
                first = clock()
            ids.extend(ev["tokens"])
        if ev.get("stop"):
            return Completion(ids, ev["tokens_predicted"], ev.get("stop_type", ""), ev.get("timings", {}),
                              first, clock())
    raise ValueError("llama-server stream ended without a final (stop: true) event")


def complete(url: str, body: dict) -> Completion:
    req = urllib.request.Request(url + "/completion", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return collect_stream(r)
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            msg = error_message(json.loads(body))
        except (ValueError, AttributeError):
            msg = f"llama-server: HTTP {e.code}: {body[:300]!r}"
        raise LlamaCppError(msg) from None


def server_ctx(wl: Workload, parallel: int) -> int:
    """-c for ``parallel`` slots: each slot holds its longest prompt plus ``max_new_tokens``,
    rounded up to 256 tokens."""
    per_slot = max(map(len, wl.prompts)) + wl.max_new_tokens
    return parallel * (-(-per_slot // 256) * 256)


def run_llama_server(gguf: Path, parallel: int, threads: int, wl: Workload, system: str) -> RunResult:
    """A fresh server (no prompt cache from earlier runs, as cbgen gets a fresh engine) fed every
    request at t0, at most ``parallel`` in flight. Timing as in measure.py: from t0, so queueing counts.
    The server's own warm-up decode runs at start, before t0; start-up is ``setup_s``."""
    with LlamaServer(ServerSpec(gguf, parallel, server_ctx(wl, parallel), threads)) as srv:
        pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="llama-client")
        try:
            start_rss, _, cpu0 = srv.usage()
            t0 = now()
            futs = [pool.submit(complete, srv.url, completion_body(p, wl)) for p in wl.prompts]
            outs = [f.result() for f in futs]
            wall = now() - t0
            _, peak_rss, cpu1 = srv.usage()
        finally:
            # Ctrl-C or an error: drop queued requests; stopping the server ends the in-flight ones.
            pool.shutdown(wait=False, cancel_futures=True)
    timings = [RequestTiming(o.tokens_predicted, o.first_token_at and o.first_token_at - t0,
                             o.finished_at - t0) for o in outs]
    res = RunResult(system, wl.name, wl.num_requests, wl.num_requests, wall, requests=timings,
                    setup_s=srv.start_s, token_ids=[o.token_ids for o in outs],
                    meta={"gguf": gguf.name, "np": parallel})
    # The server's own process, not the bench's: its peak covers its start-up too (it is fresh).
    res.peak_rss_mb, res.start_rss_mb, res.cpu_s = peak_rss, start_rss, cpu1 - cpu0
    stops = {}
    for o in outs:
        stops[o.stop_type] = stops.get(o.stop_type, 0) + 1
    res.notes.append(f"llama-server -np {parallel} -c {srv.spec.ctx} -t {threads} on {gguf.name}; "
                     f"streamed /completion with token ids, at most {parallel} in flight; "
                     f"fresh server per run; stop types {stops}; RSS and CPU are the server process's")
    return res


# ---- which GGUFs ---------------------------------------------------------------------------

def bf16_gguf(src: Path, cache: Path) -> Path:
    """``src`` requantized to BF16 with ``llama-quantize --allow-requantize`` into ``cache``, once
    (redone when ``src`` changes). LlamaCppError if llama-quantize is missing or fails."""
    stem = src.name.removesuffix(".gguf")
    out = cache / f"{stem}-requant-BF16.gguf"
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    exe = find_tool("llama-quantize")
    if exe is None:
        raise LlamaCppError(missing_note("llama-quantize"))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    proc = subprocess.run([str(exe), "--allow-requantize", str(src), str(tmp), "BF16"],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise LlamaCppError(f"llama-quantize exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}")
    shutil.move(tmp, out)   # atomic within one directory: a half-written file is never found
    return out


def select_ggufs(given: tuple[str, ...], model: str | None) -> list[Path]:
    """The GGUFs llama.cpp runs on: ``given`` (``--gguf``), else the GGUF ``model`` resolves to (the
    embedded one by default). ValueError when there is none (a Hugging Face dir and no --gguf) or a
    given file is missing."""
    if given:
        paths = [Path(g).expanduser() for g in given]
        bad = [str(p) for p in paths if not p.is_file()]
        if bad:
            raise ValueError(f"--gguf: no such file: {', '.join(bad)}")
    else:
        from ..models.resolve import resolve_model
        r = resolve_model(model)
        if not r.is_gguf:
            raise ValueError(f"llama.cpp needs a GGUF: {r.name} is not one (pass --gguf PATH)")
        paths = [r.path]
    return paths


def server_systems(ggufs: list[Path], nps: tuple[int, ...], threads: int) -> dict:
    """``{system name: run(workload) -> RunResult}``, one per GGUF and -np, named
    ``llama-server <gguf stem> -np N``."""
    out = {}
    for g in ggufs:
        for n in nps:
            name = f"llama-server {g.name.removesuffix('.gguf')} -np {n}"
            out[name] = lambda wl, g=g, n=n, name=name: run_llama_server(g, n, threads, wl, name)
    return out
