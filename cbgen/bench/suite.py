"""``cbgen bench``: every selected system on every selected workload, in one process.

Each system gets its own freshly loaded model and a small untimed warm-up; the
offline workloads then run in ``repeats`` rounds, the systems back to back per
workload. Figures go into one result dict; ``run_bench``
writes it as JSON (plus the concurrency plot) and returns it.

llama.cpp (llamacpp.py) runs in its own processes on a GGUF: each ``llama-server -np N`` is one
more system in the rounds (a fresh server per run), ``llama-bench`` runs once per GGUF at the end.
"""

from __future__ import annotations

import gc
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..compute import compute_thread
from ..config import EngineConfig, ModelConfig, _check, _is_int, _is_num
from . import report
from .baselines import run_generate_batch, run_hf_sequential, run_hf_static
from .coldstart import cold_start
from .engine_runs import busy_batch_ttft, decode_throughput, run_arrivals, run_cbgen
from .measure import RssSampler, RunResult, cpu_pressure, load_avg, max_rss_mb
from .workloads import DEFAULT_PROMPTS, Workload, load_prompt_ids, real, uniform

SYSTEMS = ("hf", "static", "generate_batch", "cbgen-torch", "cbgen-direct", "cbgen", "llama-server", "llama-bench")
# cbgen-torch (opt-in): the engine without its native parts (transformers' modules,
# gather + SDPA attention), to measure what the kernel and the native forward buy.
DEFAULT_SYSTEMS = ("hf", "static", "generate_batch", "cbgen")
LLAMACPP = ("llama-server", "llama-bench")   # separate processes on a GGUF (llamacpp.py), not torch
WORKLOADS = ("uniform", "real", "arrivals", "concurrency", "busy", "coldstart")
CBGEN_ONLY = ("arrivals", "concurrency", "busy")

Status = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    prompts: str = DEFAULT_PROMPTS
    workloads: tuple[str, ...] = WORKLOADS
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    out: str = "benchmarks/out"
    model: str | None = None
    dtype: str = "auto"
    threads: int | None = None
    uniform_n: int = 64
    uniform_m: int = 128
    real_n: int = 128
    real_max_new_tokens: int = 256
    batch_size: int = 32              # HF static batching
    hf_max_prompts: int | None = 8    # cap for HF one-at-a-time; None or 0 = all
    arrivals_n: int = 64
    rate: float = 2.0                 # Poisson arrivals, requests/s
    concurrency: tuple[int, ...] = (1, 4, 16, 32, 64, 128)
    decode_steps: int = 32
    busy: int = 32
    probes: int = 10
    coldstart_repeats: int = 3
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_batched_tokens: int = EngineConfig.max_num_batched_tokens
    kv_cache_gb: float = EngineConfig.kv_cache_gb   # the engine's default pool
    repeats: int = 1                  # offline workloads: rounds over all systems (median + paired ratios)
    gguf: tuple[str, ...] = ()        # llama.cpp's GGUFs; () = the one the model resolves to
    llamacpp_np: tuple[int, ...] = (1, 4, 16, 64)   # llama-server -np, one server per value
    llamacpp_bf16: bool = False       # also a BF16 requantization of the first GGUF
    llama_bench_n: int = 128          # llama-bench -n (tokens decoded per repetition)
    llama_bench_r: int = 3            # llama-bench -r

    def __post_init__(self) -> None:
        bad = [w for w in self.workloads if w not in WORKLOADS]
        if bad:
            raise ValueError(f"workloads: unknown {bad}; known: {', '.join(WORKLOADS)}")
        bad = [s for s in self.systems if s not in SYSTEMS]
        if bad:
            raise ValueError(f"systems: unknown {bad}; known: {', '.join(SYSTEMS)}")
        for name in ("uniform_n", "uniform_m", "real_n", "real_max_new_tokens", "batch_size", "arrivals_n",
                     "decode_steps", "busy", "probes", "coldstart_repeats", "repeats", "llama_bench_n",
                     "llama_bench_r"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, value, "an integer >= 1")
        _check(self.hf_max_prompts is None or (_is_int(self.hf_max_prompts) and self.hf_max_prompts >= 0),
               "hf_max_prompts", self.hf_max_prompts, "an integer >= 0 (0 or None = all)")
        _check(_is_num(self.rate) and self.rate > 0, "rate", self.rate, "a number > 0 (requests/s)")
        _check(bool(self.concurrency) and all(_is_int(c) and c >= 1 for c in self.concurrency),
               "concurrency", self.concurrency, "one or more integers >= 1")
        _check(bool(self.llamacpp_np) and all(_is_int(n) and n >= 1 for n in self.llamacpp_np),
               "llamacpp_np", self.llamacpp_np, "one or more integers >= 1")
        # Levels of the concurrency sweep above max_num_seqs are skipped (and said so); the
        # busy batch needs its background plus the probe running together.
        _check("busy" not in self.workloads or self.busy + 1 <= self.max_num_seqs, "busy", self.busy,
               f"at most max_num_seqs - 1 = {self.max_num_seqs - 1}")

    @classmethod
    def quick(cls, **overrides) -> "BenchOptions":
        """Small sizes for smoke tests (seconds, not minutes)."""
        base = dict(uniform_n=8, uniform_m=16, real_n=8, real_max_new_tokens=32, batch_size=4, hf_max_prompts=2,
                    arrivals_n=8, rate=8.0, concurrency=(1, 4, 8), decode_steps=4, busy=4, probes=3,
                    coldstart_repeats=1, llamacpp_np=(1, 4), llama_bench_n=16, llama_bench_r=1)
        base.update(overrides)
        return cls(**base)


def _timed(fn, *args) -> RunResult:
    la, cpu = load_avg(), time.process_time()
    with RssSampler() as rss:
        res = fn(*args)
    if res.start_rss_mb is None:   # else a system in its own process (llama-server) measured itself
        res.peak_rss_mb, res.start_rss_mb = rss.peak_mb, rss.start_mb
        res.cpu_s = time.process_time() - cpu
    res.load_avg = (la, load_avg())
    return res


def run_bench(opts: BenchOptions, status: Status = lambda _m: None, *, load=None,
              write: bool = True) -> dict:
    """Run the benchmark; returns the result dict (and writes JSON + PNG under ``opts.out``).

    ``load(impl)`` returns a fresh ``LoadedModel`` (default: ``load_model`` of
    ``opts.model`` / ``opts.dtype`` / ``opts.threads``); impl is "transformers" for the
    baselines (they need transformers' model classes) and "auto" for cbgen, which
    loads the checkpoint as ``cbgen run`` does.
    """
    import torch
    import transformers

    from ..models import load_model

    ct = compute_thread()   # every torch op of every system runs there: one OpenMP team (cbgen/compute.py)
    if load is None:
        def load(impl: str):
            return ct.call(load_model, ModelConfig(model=opts.model, dtype=opts.dtype, threads=opts.threads,
                                                   impl=impl))

    stamp = time.strftime("%Y%m%d-%H%M%S")
    loaded = load("transformers")
    gc.freeze()
    tok = loaded.tokenizer
    need = max(opts.uniform_n, opts.real_n, opts.arrivals_n, opts.busy + opts.probes, max(opts.concurrency))
    prompts = load_prompt_ids(opts.prompts, tok, limit=need)
    wls = {"uniform": uniform(prompts, opts.uniform_n, opts.uniform_m),
           "real": real(prompts, opts.real_n, opts.real_max_new_tokens)}
    offline = [w for w in ("uniform", "real") if w in opts.workloads]
    result: dict = {
        "timestamp": stamp,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()},
        "env": {"model": loaded.name, "dtype": str(loaded.dtype).removeprefix("torch."),
                "threads": ct.call(torch.get_num_threads), "torch": torch.__version__,
                "transformers": transformers.__version__, "load_avg_start": load_avg(),
                "cpu_pressure_avg60_start": cpu_pressure(), "cpu_count": os.cpu_count(),
                "prompt_file": str(opts.prompts), "prompts_loaded": len(prompts)},
        "workloads": {},
    }
    if result["env"]["load_avg_start"] > 0.5:
        status(f"warning: load average {result['env']['load_avg_start']} before the bench started: other "
               "processes are using the CPU and the figures will be noisy (with all cores in use by torch, "
               "a busy neighbour stalls every parallel op; --threads 1 is more robust)")
    w = result["workloads"]
    for name in offline:
        wl = wls[name]
        spec = (f"{wl.num_requests} prompts x {wl.max_new_tokens} new tokens, EOS ignored" if wl.ignore_eos else
                f"first {wl.num_requests} prompts, at most {wl.max_new_tokens} new tokens, natural EOS")
        w[name] = {"spec": spec + f", greedy, {wl.num_prompt_tokens} prompt tokens", "systems": []}

    def ecfg(pure_torch: bool = False) -> EngineConfig:
        return EngineConfig(max_num_seqs=opts.max_num_seqs, max_num_batched_tokens=opts.max_batched_tokens,
                            kv_cache_gb=opts.kv_cache_gb, attention="torch" if pure_torch else "auto")

    warm = Workload("warmup", prompts[:2], 4, True)
    need_cbgen = "cbgen" in opts.systems and (offline or any(x in opts.workloads for x in CBGEN_ONLY))
    order = [s for s in SYSTEMS if s in opts.systems and s not in LLAMACPP
             and (offline or s == "cbgen") and (s != "cbgen" or need_cbgen)]
    ggufs, llama_fns = _llamacpp(opts, offline, result, status)
    # Every system gets its own model (cbgen, cbgen-torch and generate_batch switch the
    # attention implementation), loaded and warmed up once. Then the offline runs go in
    # rounds, per workload the systems back to back (uniform: static, cbgen; real:
    # static, cbgen; again): a slow spell of this shared machine hits both sides of a
    # ratio, and ratios are paired per round.
    runs: dict[str, dict[str, list[RunResult]]] = {name: {s: [] for s in [*order, *llama_fns]}
                                                   for name in offline}
    fns, make_cbgen = {}, None
    for system in order:
        native = system in ("cbgen", "cbgen-direct")
        if loaded is None or native != loaded.native:
            loaded = load("auto" if native else "transformers")
            gc.freeze()   # cbgen run freezes too (after building its engine); every system alike
        fns[system], make_engine = _system(system, loaded, opts, ecfg)
        if system == "cbgen":
            make_cbgen = make_engine
        status(f"{system}: warm-up")
        fns[system](warm)
        loaded = None
    # llama-server needs no warm-up here: every run starts a fresh server, which warms itself up.
    fns.update(llama_fns)
    for rnd in range(opts.repeats):
        tag = f" (round {rnd + 1}/{opts.repeats})" if opts.repeats > 1 else ""
        for name in offline:
            for system in [*order, *llama_fns]:
                _offline_run(system, fns[system], name, wls[name], runs, status, tag)
    if make_cbgen is not None:
        _cbgen_only(opts, make_cbgen, prompts, result, status)
    fns = make_cbgen = None
    if "llama-bench" in opts.systems and ggufs:
        result["llama_bench"] = _llama_bench(opts, ggufs, result["env"]["threads"], status)
    gc.unfreeze()
    gc.collect()

    for name in offline:
        chosen = {}
        for system, rs in runs[name].items():
            best = sorted(rs, key=lambda r: r.tok_s)[len(rs) // 2]     # the median run
            chosen[system] = best
            summary = best.summary()
            if len(rs) > 1:
                summary["rounds_tok_s"] = [round(r.tok_s, 1) for r in rs]
            w[name]["systems"].append(summary)
        w[name]["ratios"] = report.ratios(w[name]["systems"])
        if llama_fns:
            w[name]["llama_server_best_np"] = report.best_np(w[name]["systems"])
        if "cbgen" in runs[name]:
            cb = runs[name]["cbgen"]
            w[name]["paired_ratios"] = {
                s: report.paired(cb, rs) for s, rs in runs[name].items() if s != "cbgen" and rs[0].tok_s}
        if "cbgen" in chosen:
            ref = chosen["cbgen"].token_ids
            w[name]["agreement"] = {s: report.agreement(ref, r.token_ids)
                                    for s, r in chosen.items() if s != "cbgen"}
    if "coldstart" in opts.workloads:
        status("cold start: echo hi | cbgen run - --max-new-tokens 1")
        w["coldstart"] = cold_start(opts.coldstart_repeats, model=opts.model, dtype=opts.dtype, threads=opts.threads)
    result["env"]["load_avg_end"] = load_avg()
    result["env"]["cpu_pressure_avg60_end"] = cpu_pressure()
    result["max_rss_mb"] = round(max_rss_mb(), 1)
    result["max_rss_note"] = "getrusage high-water mark of the whole bench process (all systems)"
    result["targets"] = report.targets(result)
    if write:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        if "concurrency" in w:
            png = out / f"bench-{stamp}.png"
            note = report.plot_concurrency(w["concurrency"]["levels"], png,
                                           f"cbgen decode, {result['env']['model']} {result['env']['dtype']}, "
                                           f"{result['env']['threads']} threads")
            w["concurrency"]["plot"] = note or str(png)
        path = out / f"bench-{stamp}.json"
        report.write_json(result, path)
        result["json_path"] = str(path)
    return result


def _llamacpp(opts: BenchOptions, offline: list[str], result: dict, status: Status) -> tuple[list, dict]:
    """(GGUFs, llama-server systems) for the selected llama.cpp systems; what is skipped, and why,
    goes to ``status`` and ``result["llamacpp"]["notes"]`` (a missing binary is a note, not an error)."""
    from ..config import cache_root
    from . import llamacpp as lc
    want = [s for s in LLAMACPP if s in opts.systems]
    if not want:
        return [], {}
    notes = []
    if "llama-server" in want and not offline:
        notes.append("llama-server: runs on the uniform and real workloads only; neither is selected")
        want.remove("llama-server")
    for tool in list(want):
        if lc.find_tool(tool) is None:
            notes.append(lc.missing_note(tool))
            want.remove(tool)
    ggufs = []
    if want:
        ggufs = lc.select_ggufs(opts.gguf, opts.model)
        if opts.llamacpp_bf16:
            status(f"llama.cpp: BF16 GGUF from {ggufs[0].name} (llama-quantize, cached)")
            try:
                ggufs.append(lc.bf16_gguf(ggufs[0], cache_root() / "bench"))
            except lc.LlamaCppError as e:
                notes.append(f"--llamacpp-bf16 skipped: {e}")
    for n in notes:
        status(n)
    result["llamacpp"] = {"bin": str(lc.bin_dir()), "ggufs": [str(g) for g in ggufs], "notes": notes}
    fns = lc.server_systems(ggufs, opts.llamacpp_np, result["env"]["threads"]) if "llama-server" in want else {}
    return (ggufs if "llama-bench" in want else []), fns


def _llama_bench(opts: BenchOptions, ggufs: list, threads: int, status: Status) -> dict:
    from . import llamacpp as lc
    rows = []
    for g in ggufs:
        status(f"llama-bench: {g.name}, batch-1 decode of {opts.llama_bench_n} tokens x {opts.llama_bench_r}")
        r = lc.run_llama_bench(g, threads, opts.llama_bench_n, opts.llama_bench_r)
        rows.append({**asdict(r), "tok_s": round(r.tok_s, 2)})
        status(f"llama-bench: {g.name}: {r.ms_per_token:.2f} ms/token")
    return {"spec": f"llama-bench -n {opts.llama_bench_n} -p 0 -t {threads} -r {opts.llama_bench_r} -o json",
            "rows": rows}


def _system(system: str, loaded, opts: BenchOptions, ecfg) -> tuple[Callable, Callable]:
    """(run one workload, engine factory) for ``system`` on ``loaded``'s model."""
    from ..engine.engine import Engine
    model, ct = loaded.model, compute_thread()

    def make_engine(_pure=system == "cbgen-torch"):
        return ct.call(Engine.from_loaded, loaded, ecfg(_pure))

    fn = {"hf": lambda wl: ct.call(run_hf_sequential, model, wl, opts.hf_max_prompts),
          "static": lambda wl: ct.call(run_hf_static, model, wl, opts.batch_size),
          "generate_batch": lambda wl: ct.call(run_generate_batch, model, wl, opts.kv_cache_gb),
          "cbgen-torch": lambda wl: run_cbgen(make_engine, wl, "cbgen-torch"),
          "cbgen-direct": lambda wl: run_cbgen(make_engine, wl, "cbgen-direct"),
          "cbgen": lambda wl: run_cbgen(make_engine, wl)}[system]
    return fn, make_engine


def _offline_run(system: str, fn, name: str, wl: Workload, runs, status: Status, tag: str) -> None:
    status(f"{system}: {name} ({wl.num_requests} requests){tag}")
    res = _timed(fn, wl)
    runs[name][system].append(res)
    status(f"{system}: {name}: {res.tok_s:.1f} tok/s over {res.wall_s:.1f} s"
           + (" (capped; extrapolated)" if res.extrapolated else ""))


def _cbgen_only(opts: BenchOptions, make_engine, prompts: list[list[int]], result: dict, status: Status) -> None:
    w = result["workloads"]
    if "arrivals" in opts.workloads:
        wl = real(prompts, opts.arrivals_n, opts.real_max_new_tokens)
        status(f"cbgen: arrivals ({wl.num_requests} requests at {opts.rate}/s)")
        res = _timed(compute_thread().call, run_arrivals, make_engine, wl, opts.rate)
        w["arrivals"] = {"spec": f"{wl.num_requests} real prompts, Poisson {opts.rate} req/s, "
                                 f"at most {wl.max_new_tokens} new tokens, natural EOS",
                         "result": res.summary()}
    if "concurrency" in opts.workloads:
        levels = []
        skipped = [c for c in opts.concurrency if c > opts.max_num_seqs]
        if skipped:
            status(f"cbgen: concurrency {skipped} skipped: above max_num_seqs={opts.max_num_seqs}")
        for c in (c for c in opts.concurrency if c <= opts.max_num_seqs):
            status(f"cbgen: decode at concurrency {c}")
            levels.append(compute_thread().call(decode_throughput, make_engine, prompts, c, opts.decode_steps))
            status(f"cbgen: concurrency {c}: {levels[-1]['tok_s']} tok/s")
        w["concurrency"] = {"spec": f"{opts.decode_steps} timed decode steps after all sequences prefilled",
                            "levels": levels}
    if "busy" in opts.workloads:
        status(f"cbgen: busy-batch TTFT ({opts.probes} probes into {opts.busy} decoding)")
        bg = prompts[:opts.busy]
        probes = prompts[opts.busy:opts.busy + opts.probes] or prompts[:opts.probes]
        w["busy"] = busy_batch_ttft(make_engine, bg, probes, busy=opts.busy)
