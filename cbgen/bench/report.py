"""Turn a bench result dict into a Markdown report, a JSON file and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

SYSTEM_LABELS = {"hf": "HF generate, one at a time", "static": "HF static batching",
                 "generate_batch": "transformers generate_batch",
                 "cbgen-torch": "cbgen, pure torch (HF modules, gather + SDPA)",
                 "cbgen-direct": "cbgen, Engine.generate on the compute thread (diagnostic: no Driver)",
                 "cbgen": "cbgen"}   # through the Driver, as `cbgen run` (see engine_runs.py)


def label(system: str) -> str:
    """Report label of a system; llama.cpp rows are named by their GGUF and -np (llamacpp.py)."""
    return SYSTEM_LABELS.get(system, system)


def best_np(rows: list[dict]) -> dict[str, str]:
    """Per GGUF, the llama-server row (system name) with the highest tok/s."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["system"].startswith("llama-server") and r["tok_s"] > best.get(r["gguf"], {"tok_s": -1})["tok_s"]:
            best[r["gguf"]] = r
    return {g: r["system"] for g, r in best.items()}


def _f(v, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def agreement(ref: list[list[int]], other: list[list[int]]) -> dict:
    """How far greedy outputs agree (bf16 batch numerics may differ): exact matches and
    the mean fraction of each output that is a common prefix."""
    n = min(len(ref), len(other))
    if n == 0:
        return {"compared": 0, "exact": 0, "prefix_frac": None}
    exact, fracs = 0, []
    for a, b in zip(ref[:n], other[:n]):
        exact += a == b
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        fracs.append(k / max(len(a), len(b), 1))
    return {"compared": n, "exact": exact, "prefix_frac": round(sum(fracs) / n, 3)}


def ratios(rows: list[dict]) -> dict[str, dict]:
    """cbgen / other, by generated tok/s and by wall time for the same requests."""
    cb = next((r for r in rows if r["system"] == "cbgen"), None)
    out = {}
    if cb is None:
        return out
    for r in rows:
        if r["system"] == "cbgen" or not r["tok_s"]:
            continue
        out[r["system"]] = {"tok_s": round(cb["tok_s"] / r["tok_s"], 2),
                            "time": round(r["projected_wall_s"] / cb["wall_s"], 2) if cb["wall_s"] else None}
    return out


def paired(cbgen_runs: list, other_runs: list) -> dict:
    """cbgen / other tok/s per round (runs of one round were made back to back), and the median."""
    per_round = [round(c.tok_s / o.tok_s, 2) for c, o in zip(cbgen_runs, other_runs)]
    rs = sorted(per_round)
    return {"per_round": per_round, "median": rs[len(rs) // 2], "min": rs[0]}


def targets(result: dict) -> list[dict]:
    """Each issue target: measured value, threshold, holds (None when not measured)."""
    w = result.get("workloads", {})
    t = []

    def ratio(wl, system):   # with repeats: the median of the per-round paired ratios
        p = w.get(wl, {}).get("paired_ratios", {}).get(system)
        return p["median"] if p else w.get(wl, {}).get("ratios", {}).get(system, {}).get("tok_s")

    for wl, system, need in (("uniform", "static", 2.0), ("uniform", "generate_batch", 3.0),
                             ("real", "static", 3.0)):
        v = ratio(wl, system)
        t.append({"target": f"{wl}: cbgen >= {need:g}x {SYSTEM_LABELS[system]} (tok/s)",
                  "measured": v, "holds": None if v is None else v >= need})
    for gguf, system in w.get("real", {}).get("llama_server_best_np", {}).items():
        v = ratio("real", system)
        t.append({"target": f"real: cbgen >= 2x llama-server at its best -np on {gguf} (tok/s)",
                  "measured": v, "holds": None if v is None else v >= 2.0})
    conc = {c["concurrency"]: c["tok_s"] for c in w.get("concurrency", {}).get("levels", [])}
    v = conc.get(64)
    t.append({"target": "decode at 64 concurrent sequences >= 400 tok/s", "measured": v,
              "holds": None if v is None else v >= 400})
    busy = w.get("busy")
    # The target is about a batch of 32; a smaller background (--quick) is measured, not judged.
    t.append({"target": "busy batch of 32: probe TTFT p50 < 1 s", "measured": busy and busy["ttft_p50_s"],
              "holds": busy["holds"] if busy and busy.get("busy") == 32 else None})
    cold = w.get("coldstart")
    t.append({"target": "cold start `echo hi | cbgen run -` to first byte < 3 s",
              "measured": cold and cold["first_byte_p50_s"], "holds": cold and cold["holds"]})
    return t


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"cbgen bench {result['timestamp']}: {env['model']} {env['dtype']}, torch {env['torch']} "
             f"({env['threads']} threads), transformers {env['transformers']}; 1-min load avg at start "
             f"{env['load_avg_start']}, at end {env.get('load_avg_end')}; CPU pressure (PSI some avg60) "
             f"{env.get('cpu_pressure_avg60_start')}% -> {env.get('cpu_pressure_avg60_end')}%", ""]
    w = result["workloads"]
    for name in ("uniform", "real"):
        if name not in w:
            continue
        d = w[name]
        best = set(d.get("llama_server_best_np", {}).values())
        lines += [f"### {name}: {d['spec']}", "",
                  "| system | tok/s | req/s | wall s | TTFT p50 / p99 s | TPOT p50 / p99 ms | peak RSS MB "
                  "| cbgen x (tok/s) | cbgen x (time) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d["systems"]:
            ra = d["ratios"].get(r["system"], {})
            wall = _f(r["projected_wall_s"], "{:.1f}") + (" (extrap.)" if r["extrapolated"] else "")
            lines.append(
                f"| {label(r['system'])}{' (best -np)' if r['system'] in best else ''}"
                f"{' *' if r['extrapolated'] else ''} | {_f(r['tok_s'], '{:.1f}')} "
                f"| {_f(r['req_s'], '{:.3f}')} | {wall} | {_f(r['ttft_p50_s'])} / {_f(r['ttft_p99_s'])} "
                f"| {_f(r['tpot_p50_s'] and 1000 * r['tpot_p50_s'], '{:.1f}')} / "
                f"{_f(r['tpot_p99_s'] and 1000 * r['tpot_p99_s'], '{:.1f}')} | {_f(r['peak_rss_mb'], '{:.0f}')} "
                f"| {_f(ra.get('tok_s'))} | {_f(ra.get('time'))} |")
        for r in d["systems"]:
            for note in r["notes"]:
                lines.append(f"- {r['system']}: {note}")
        for r in d["systems"]:
            if "rounds_tok_s" in r:
                lines.append(f"- {r['system']}: tok/s per round {r['rounds_tok_s']} (the table shows the median round)")
        paired = d.get("paired_ratios", {})
        for sysname, p in paired.items():
            if len(p["per_round"]) > 1:
                lines.append(f"- cbgen / {sysname} per round (back to back): {p['per_round']}, "
                             f"median {p['median']}, min {p['min']}")
        for sysname, ag in d.get("agreement", {}).items():
            lines.append(f"- greedy agreement {sysname} vs cbgen: {ag['exact']}/{ag['compared']} identical, "
                         f"mean common prefix {ag['prefix_frac']}")
        lines.append("")
    if "arrivals" in w:
        r = w["arrivals"]["result"]
        lines += [f"### arrivals: {w['arrivals']['spec']}", "",
                  f"{r['tok_s']} tok/s, {r['req_s']} req/s; TTFT p50 {r['ttft_p50_s']} s / p99 {r['ttft_p99_s']} s; "
                  f"TPOT p50 {_f(r['tpot_p50_s'] and 1000 * r['tpot_p50_s'], '{:.1f}')} ms / "
                  f"p99 {_f(r['tpot_p99_s'] and 1000 * r['tpot_p99_s'], '{:.1f}')} ms; "
                  f"latency p50 {r['latency_p50_s']} s / p99 {r['latency_p99_s']} s", ""]
    if "concurrency" in w:
        lines += ["### cbgen decode throughput vs concurrency", "", "| concurrency | tok/s | step ms |",
                  "|---:|---:|---:|"]
        lines += [f"| {c['concurrency']} | {c['tok_s']} | {c['step_ms']} |" for c in w["concurrency"]["levels"]]
        lines.append("")
    lines += _llama_bench_lines(result)
    if "busy" in w:
        b = w["busy"]
        lines += [f"### busy batch: probe TTFT with {b['busy']} decoding", "",
                  f"p50 {b['ttft_p50_s']} s, p99 {b['ttft_p99_s']} s, max {b['ttft_max_s']} s over {b['probes']} "
                  f"probes (running at submit: {b['running_at_submit']})", ""]
    if "coldstart" in w:
        c = w["coldstart"]
        lines += ["### cold start", "", f"`{c['command']}`: first stdout byte {c['first_byte_s']} s "
                  f"(p50 {c['first_byte_p50_s']} s), exit {c['exit_s']} s", ""]
        if "phases" in c:
            lines.append("- phases (fresh interpreter): " + ", ".join(f"{k} {v}" for k, v in c["phases"].items()))
        for row in c.get("import_breakdown", []):
            lines.append(f"- {'  ' * row['depth']}import {row['module']}: {row['cumulative_ms']:.0f} ms cumulative")
        lines.append("")
    lines += ["### targets", "", "| target | measured | holds |", "|---|---:|---|"]
    for t in result["targets"]:
        holds = "–" if t["holds"] is None else ("yes" if t["holds"] else "NO")
        lines.append(f"| {t['target']} | {_f(t['measured'])} | {holds} |")
    return "\n".join(lines) + "\n"


def _llama_bench_lines(result: dict) -> list[str]:
    """Batch-1 decode: llama-bench per GGUF next to cbgen's 1-sequence step (concurrency sweep)."""
    lc = result.get("llamacpp", {})
    lb = result.get("llama_bench")
    lines = [f"- llama.cpp: {n}" for n in lc.get("notes", [])]
    if lb:
        one = next((c for c in result["workloads"].get("concurrency", {}).get("levels", [])
                    if c["concurrency"] == 1), None)
        lines += ["### batch-1 decode: llama-bench vs cbgen at 1 sequence", "", f"`{lb['spec']}`", "",
                  "| system | ms/token | tok/s |", "|---|---:|---:|"]
        lines += [f"| llama-bench {r['gguf']} ({r['model_type']}) | {r['ms_per_token']:.2f} ± "
                  f"{r['ms_per_token_stddev']:.2f} | {r['tok_s']:.1f} |" for r in lb["rows"]]
        env = result["env"]
        lines.append(f"| cbgen {env['model']} {env['dtype']}, decode step at concurrency 1 | {one['step_ms']} "
                     f"| {one['tok_s']} |" if one else
                     "| cbgen, 1 sequence | not measured: add concurrency to --workloads | – |")
    return lines + [""] if lines else []


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def plot_concurrency(levels: list[dict], path: Path, title: str) -> str | None:
    """A PNG of decode tok/s vs concurrency; returns a note instead when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'cbgen[plot]')"
    xs = [c["concurrency"] for c in levels]
    ys = [c["tok_s"] for c in levels]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, ys, marker="o", label="cbgen aggregate decode")
    ax.axhline(400, color="grey", linestyle="--", linewidth=1, label="target at 64: 400 tok/s")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent sequences")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
