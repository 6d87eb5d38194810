"""Issue #11's must-show: `cbgen chat` with 3 concurrent prompts runs within 10% of the
aggregate tok/s of `cbgen run` on the same 3 prompts.

    python benchmarks/chat_concurrency.py [--max-new-tokens 256] [--rounds 5] [--dtype bfloat16]
                                          [--quantize none] [--limit 1.10] [--json OUT]

The prompts: the user text of the first 3 chat lines of --prompts (a single user message, no
system message), greedy (temperature 0, top_p 1), each exactly --max-new-tokens new tokens
(``ignore_eos``: a JSONL field for run, ``/set ignore_eos on`` typed in chat). Every mode is a
fresh process of the embedded model with the same --dtype/--quantize; each round runs them in
turn, --rounds rounds:

- ``run``: ``cbgen run IN.jsonl -o OUT.jsonl -q``;
- ``chat``: ``cbgen chat --json-log LOG`` in its interactive REPL on a pseudo-terminal
  (100x30, TERM=xterm-256color). A thread drains its output and answers cursor position
  requests as a terminal does (prompt-toolkit draws the live toolbar only then), so the
  screen is drawn as a user sees it. Once the banner is up the script types
  ``/set ignore_eos on``, then the 3 prompts (each line + Enter, --gap s apart), waits for
  3 records in LOG, types ``/stats`` (its "mean ... tok/s while busy" is reported as
  ``stats_tok_s``) and ``/quit``. Also reported: the REPL thread's CPU seconds while the
  prompts ran (``ui_cpu_s``, from /proc) and the bytes drawn on the terminal;
- ``piped``: ``cbgen chat --json-log LOG < FILE`` (the same lines, stdin a file).

What counts: aggregate tok/s = completion tokens of the 3 records / generation span, with the
span from the records' ``timings.total_s`` (arrival -> finish of each request). The records
carry no absolute times, so span = max_i(offset_i + total_s_i), where offset_i is when
prompt i was typed after prompt 1 (the script's clock; 0 for run and piped, whose 3 prompts
arrive together); this is exact when arrivals follow the typing, which holds to the few ms
the REPL takes per line. ``wall_s`` is the whole process, model load included, for
reference. Reported: per-mode medians, chat/run and piped/run ratios; exit 1 if run's tok/s
over chat's exceeds --limit.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CBGEN = [sys.executable, "-m", "cbgen.cli"]
GREEDY = ["--temperature", "0", "--top-p", "1"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


def user_texts(path: Path, n: int) -> list[str]:
    """The user text of the first ``n`` lines that are one user message (and one line of text)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = json.loads(line).get("messages") if line.strip() else None
        if m and len(m) == 1 and m[0]["role"] == "user" and "\n" not in m[0]["content"]:
            out.append(m[0]["content"])
    if len(out) < n:
        sys.exit(f"{path}: only {len(out)} single-message chat lines, need {n}")
    return out[:n]


def figures(records: list[dict], offsets: list[float], wall: float) -> dict:
    """Aggregate tok/s of one process from its records (in submission order) and typing offsets (s)."""
    records = sorted(records, key=lambda r: int(r["id"]))   # ids 1..3 in every mode
    if len(records) != len(offsets) or any(r["finish_reason"] != "length" for r in records):
        raise RuntimeError(f"expected {len(offsets)} 'length' records, got "
                           f"{[(r['id'], r['finish_reason'], r.get('error')) for r in records]}")
    tokens = sum(r["usage"]["completion_tokens"] for r in records)
    span = max(off + r["timings"]["total_s"] for off, r in zip(offsets, records))
    return {"tokens": tokens, "span_s": round(span, 3), "tok_s": round(tokens / span, 1), "wall_s": round(wall, 2),
            "typed_spread_s": round(offsets[-1], 3), "texts": [r["text"] for r in records]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def call(cmd: list[str], stdin=subprocess.DEVNULL) -> None:
    """Run a cbgen process to its end (stdout discarded); its stderr only when it fails."""
    p = subprocess.run(cmd, cwd=ROOT, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:4])} exited {p.returncode}:\n{p.stderr[-2000:]}")


def mode_run(texts: list[str], a, tmp: Path) -> dict:
    inp, out = tmp / "run.jsonl", tmp / "run.out.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i + 1), "messages": [{"role": "user", "content": t}],
                                       "ignore_eos": True}) + "\n" for i, t in enumerate(texts)))
    t0 = time.monotonic()
    call([*CBGEN, "run", str(inp), "-o", str(out), "-q", *a.common])
    return figures(read_jsonl(out), [0.0] * len(texts), time.monotonic() - t0)


def mode_piped(texts: list[str], a, tmp: Path) -> dict:
    inp, log = tmp / "piped.txt", tmp / "piped.log.jsonl"
    inp.write_text("/set ignore_eos on\n" + "".join(t + "\n" for t in texts))
    t0 = time.monotonic()
    with open(inp, "rb") as f:
        call([*CBGEN, "chat", "--json-log", str(log), *a.common], stdin=f)
    return figures(read_jsonl(log), [0.0] * len(texts), time.monotonic() - t0)


class Terminal:
    """A child process on a pseudo-terminal; a thread keeps its output (the screen bytes) drained."""

    def __init__(self, cmd: list[str], cols: int = 100, rows: int = 30) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.master, self.out, self.rows, self._scan = master, bytearray(), rows, 0
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:   # EIO: the child closed the terminal
                return
            if not chunk:
                return
            self.out += chunk
            # A terminal answers a cursor position request; prompt-toolkit draws the bottom
            # toolbar (the live view) only once it has an answer. The cursor is on the last row.
            while (i := self.out.find(b"\x1b[6n", self._scan)) >= 0:
                self._scan = i + 4
                os.write(self.master, f"\x1b[{self.rows};1R".encode())
            self._scan = max(self._scan, len(self.out) - 3)

    def text(self, start: int = 0) -> str:
        return ANSI.sub(b"", bytes(self.out[start:])).decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float, start: int = 0) -> None:
        end = time.monotonic() + timeout
        while needle not in self.text(start):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"no {needle!r} on the chat's screen; it shows:\n{self.text()[-2000:]}")
            time.sleep(0.05)

    def main_thread_cpu(self) -> float:
        """CPU seconds (user + system) of the child's main thread: the REPL's asyncio loop."""
        fields = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def type(self, line: str) -> float:
        os.write(self.master, line.encode() + b"\r")
        return time.monotonic()


def mode_chat(texts: list[str], a, tmp: Path) -> dict:
    log = tmp / "chat.log.jsonl"
    t0 = time.monotonic()
    term = Terminal([*CBGEN, "chat", "--json-log", str(log), *a.common])
    try:
        term.wait_for("/help for commands", timeout=300)
        mark = len(term.out)
        term.type("/set ignore_eos on")
        term.wait_for("ignore_eos=True", timeout=10, start=mark)
        typed, cpu0 = [], term.main_thread_cpu()
        for t in texts:
            typed.append(term.type(t))
            time.sleep(a.gap)
        end = time.monotonic() + 600
        while not (log.exists() and log.read_bytes().count(b"\n") >= len(texts)):   # whole records
            if term.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"chat did not answer {len(texts)} prompts:\n{term.text()[-2000:]}")
            time.sleep(0.05)
        ui_cpu = term.main_thread_cpu() - cpu0
        mark = len(term.out)
        term.type("/stats")
        term.wait_for("prefix ", timeout=10, start=mark)
        stats = re.search(r"mean ([0-9.]+) tok/s while busy", term.text(mark))
        term.type("/quit")
        term.proc.wait(timeout=60)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()
    fig = figures(read_jsonl(log), [t - typed[0] for t in typed], time.monotonic() - t0)
    fig.update(stats_tok_s=float(stats.group(1)) if stats else None, ui_cpu_s=round(ui_cpu, 2),
               screen_bytes=len(term.out))
    if a.screen:
        Path(a.screen).write_text(term.text(), encoding="utf-8")
    return fig


MODES = {"run": mode_run, "chat": mode_chat, "piped": mode_piped}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=Path, default=Path("/work/shared/bench/prompts-dev.jsonl"))
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every mode; the medians count (one round moves by +-10%%)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between two typed prompts")
    ap.add_argument("--limit", type=float, default=1.10, help="fail if run tok/s / chat tok/s exceeds this")
    ap.add_argument("--modes", default="run,chat,piped", help="a diagnostic subset (run and chat are needed)")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--screen", help="write the last chat's screen (escape codes removed) to this file")
    a = ap.parse_args()
    # The same sampling and model options for every mode.
    a.common = ["--max-new-tokens", str(a.max_new_tokens), *GREEDY, "--dtype", a.dtype, "--quantize", a.quantize]
    texts = user_texts(a.prompts, 3)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cbgen-chatbench-") as tmp:
        for r in range(a.rounds):
            got = {}
            for name in a.modes.split(","):
                (d := Path(tmp) / f"{r}-{name}").mkdir()
                f = got[name] = MODES[name](texts, a, d)
                extra = f" · /stats {f['stats_tok_s']} tok/s · typed over {f['typed_spread_s']}s · " \
                    f"REPL thread CPU {f['ui_cpu_s']}s · {f['screen_bytes']} bytes drawn" \
                    if name == "chat" else ""
                print(f"round {r + 1} {name:5} {f['tok_s']:7.1f} tok/s ({f['tokens']} tokens in {f['span_s']:.2f}s; "
                      f"process {f['wall_s']:.1f}s){extra}", file=sys.stderr)
            rounds.append(got)
    med = {m: statistics.median(g[m]["tok_s"] for g in rounds) for m in rounds[0]}
    same = sum(x == y for x, y in zip(rounds[-1]["run"]["texts"], rounds[-1]["chat"]["texts"]))
    report = {"max_new_tokens": a.max_new_tokens, "dtype": a.dtype, "quantize": a.quantize, "prompts": texts,
              "median_tok_s": med, "chat_over_run": round(med["chat"] / med["run"], 3),
              "piped_over_run": round(med["piped"] / med["run"], 3) if "piped" in med else None,
              "same_texts_chat_run": same, "limit": a.limit,
              "rounds": [{m: {k: v for k, v in f.items() if k != "texts"} for m, f in g.items()} for g in rounds]}
    ok = med["run"] / med["chat"] <= a.limit
    piped = f"piped {med['piped']:.1f} ({report['piped_over_run']:.3f}x) · " if "piped" in med else ""
    print(f"median tok/s: run {med['run']:.1f} · chat {med['chat']:.1f} ({report['chat_over_run']:.3f}x) · "
          f"{piped}same texts chat/run {same}/3 · {'PASS' if ok else 'FAIL'} (limit: run/chat <= {a.limit})")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
