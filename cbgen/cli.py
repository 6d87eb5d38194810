"""Typer app: parses options, builds config + front-end; nothing else.

Results go to stdout, status and errors to stderr. User errors are one line
(``error: ...``) with exit code 2; a run with failed lines exits 1.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Optional

import typer
from rich.console import Console

from .config import EngineConfig, ModelConfig, SamplingParams

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Batch and interactive LLM generation on a continuous-batching engine.")
err = Console(stderr=True)

ModelOpt = typer.Option(None, "--model", "-m", help="Local HF model dir, a .gguf file, or org/name in the "
                        "local HF cache. Default: the embedded SmolLM2-135M-Instruct.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 (auto: bf16 where the CPU has native bf16).")
ThreadsOpt = typer.Option(None, "--threads", help="Torch threads (default: all cores).")


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(model: str | None, dtype: str, threads: int | None):
    """Load the model, turning every expected failure into a one-line error."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never a network hang
    from .models import ModelError, load_model
    try:
        cfg = ModelConfig(model=model, dtype=dtype, threads=threads)
        return load_model(cfg, status=lambda msg: err.print(msg, style="dim", highlight=False))
    except (ModelError, ValueError) as e:
        fail(str(e))


def _engine_config(max_num_seqs: int, max_batched_tokens: int, kv_cache_gb: float, prefix_cache: bool,
                   attention: str = "auto") -> EngineConfig:
    """Validated before the model loads, so a bad option fails in milliseconds."""
    try:
        return EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
                            kv_cache_gb=kv_cache_gb, enable_prefix_caching=prefix_cache, attention=attention)
    except ValueError as e:
        fail(str(e))


def _engine(loaded, cfg: EngineConfig):
    from .engine.engine import Engine
    from .engine.runner import UnsupportedModelError
    try:
        engine = Engine.from_loaded(loaded, cfg)
    except (UnsupportedModelError, ValueError) as e:
        fail(str(e))
    # torch + transformers leave ~1M tracked objects; without this the first full
    # collection lands in an early step (~0.2 s, a tenth of the cold start).
    gc.freeze()
    return engine


def _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, n) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                              stop=tuple(stop or ()), n=n)
    except ValueError as e:
        fail(f"option {e}")


def _structured(json_mode: bool, json_schema: str | None, regex: str | None, choice: str | None,
                grammar: str | None):
    from .io.structured_fields import from_options
    try:
        return from_options(json_mode, json_schema, regex, choice, grammar)
    except ValueError as e:
        fail(str(e))


@app.command()
def run(
    inputs: list[str] = typer.Argument(..., help="Input files; '-' reads stdin as a stream."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output file (default: stdout)."),
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    fmt: str = typer.Option("jsonl", "--format", help="jsonl | openai (OpenAI Batch output lines) | text."),
    text: bool = typer.Option(False, "--text", help="Print just the generated text (same as --format text)."),
    order: Optional[str] = typer.Option(None, "--order", help="finish (default for stdin) | input (default for files)."),
    resume: bool = typer.Option(False, "--resume", help="Skip ids already in --output and append the rest."),
    validate: bool = typer.Option(False, "--validate", help="Check inputs (parsing, templates, lengths); generate nothing."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for chat inputs that have none."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    samples: int = typer.Option(1, "--samples", help="Samples per prompt (n)."),
    json_mode: bool = typer.Option(False, "--json", help="Constrain outputs to a JSON object (needs cbgen[structured])."),
    json_schema: Optional[str] = typer.Option(None, "--json-schema", help="Constrain outputs to this JSON schema file."),
    regex: Optional[str] = typer.Option(None, "--regex", help="Constrain outputs to match this regex."),
    choice: Optional[str] = typer.Option(None, "--choice", help="Constrain outputs to one of these labels: a,b,c."),
    grammar: Optional[str] = typer.Option(None, "--grammar", help="Constrain outputs to this Lark (or GBNF) grammar file."),
    max_num_seqs: int = typer.Option(EngineConfig.max_num_seqs, "--max-num-seqs",
                                      help="Sequences decoding at once."),
    max_batched_tokens: int = typer.Option(EngineConfig.max_num_batched_tokens, "--max-batched-tokens",
                                           help="Token budget of one step."),
    kv_cache_gb: float = typer.Option(EngineConfig.kv_cache_gb, "--kv-cache-gb", help="Memory for the KV cache pool."),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache"),
    attention: str = typer.Option("auto", "--attention",
                                  help="Decode attention: auto | native (C kernel, built once) | torch."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no summary on stderr."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Live view on stderr (default: when stderr is a terminal)."),
) -> None:
    """Generate for every line of INPUTS; one JSONL record per line as it finishes."""
    from .frontends.run import BatchRun, RunOptions
    if text:
        fmt = "text"
    if fmt not in ("jsonl", "openai", "text"):
        fail(f"--format {fmt!r}: expected jsonl, openai or text")
    order = order or ("finish" if "-" in inputs else "input")
    if order not in ("finish", "input"):
        fail(f"--order {order!r}: expected finish or input")
    if resume and not output:
        fail("--resume needs --output FILE")
    for path in inputs:
        if path != "-" and not os.path.isfile(path):
            fail(f"input {path!r}: no such file")
    defaults = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, samples)
    structured = _structured(json_mode, json_schema, regex, choice, grammar)
    cfg = _engine_config(max_num_seqs, max_batched_tokens, kv_cache_gb, not no_prefix_cache, attention)
    loaded = _load(model, dtype, threads)
    if validate:
        from .frontends.validate import validate_inputs
        raise typer.Exit(validate_inputs(inputs, loaded, defaults, system, err))
    engine = _engine(loaded, cfg)
    if structured is not None:
        try:  # a bad default would fail every line: say so once, before the run
            engine.grammars.compile(structured)
        except ValueError as e:
            fail(str(e).replace("field '", "option '", 1))
    opts = RunOptions(inputs=inputs, output=output, fmt=fmt, order=order, resume=resume, system=system,
                      defaults=defaults, quiet=quiet, progress=progress, model_name=loaded.name,
                      structured=structured)
    code = BatchRun(engine, loaded.tokenizer, opts, err).run()
    raise typer.Exit(code)


@app.command()
def info(model: Optional[str] = ModelOpt, dtype: str = DtypeOpt, threads: Optional[int] = ThreadsOpt) -> None:
    """Show what would be loaded: path, architecture, parameters, dtype, context, template."""
    from .models import model_info
    loaded = _load(model, dtype, threads)
    for k, v in model_info(loaded).items():
        typer.echo(f"{k:<18} {v}")


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    system: Optional[str] = typer.Option(None, "--system", help="System message for new conversations."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.7, "--temperature", "-t"),
    top_p: float = typer.Option(0.9, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs"),
) -> None:
    """Interactive REPL: every prompt you submit joins the running batch."""
    from .frontends.chat import run_chat
    defaults = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, None, 1)
    cfg = _engine_config(max_num_seqs, max(256, max_num_seqs), EngineConfig.kv_cache_gb, True)
    loaded = _load(model, dtype, threads)
    engine = _engine(loaded, cfg)
    raise typer.Exit(run_chat(engine, loaded, defaults, system=system))


@app.command()
def bench(
    prompts: str = typer.Option("../shared/bench/prompts-dev.jsonl", "--prompts",
                                help="JSONL prompt file (relative paths from the current dir)."),
    workloads: str = typer.Option("uniform,real,arrivals,concurrency,busy,coldstart", "--workloads",
                                  help="Comma list of uniform, real, arrivals, concurrency, busy, coldstart."),
    systems: str = typer.Option("hf,static,generate_batch,cbgen", "--systems",
                                help="Comma list of hf, static, generate_batch, cbgen-torch, cbgen "
                                     "(cbgen-torch: without its native kernel and forward, for A/B)."),
    out: str = typer.Option("benchmarks/out", "--out", help="Directory for bench-<timestamp>.json and .png."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes (a smoke test, not a measurement)."),
    hf_max_prompts: Optional[int] = typer.Option(None, "--hf-max-prompts",
                                                 help="Cap for HF one-at-a-time, the rest extrapolated "
                                                      "(default 8, 2 with --quick; 0 = all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="HF static batch size (default 32, 4 with --quick)."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Poisson arrivals per second (default 2, 8 with --quick)."),
    repeats: Optional[int] = typer.Option(None, "--repeats",
                                          help="Rounds of the offline workloads over all systems, round-robin; "
                                               "reports medians and per-round paired ratios (default 1)."),
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Throughput and latency: HF generate, HF static batching, generate_batch and cbgen on one prompt file."""
    from .bench import BenchOptions, run_bench
    from .bench.report import markdown
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    if not os.path.isfile(prompts):
        fail(f"--prompts {prompts!r}: no such file (the default is relative to the repo root)")
    try:
        kw = dict(prompts=prompts, workloads=split(workloads), systems=split(systems), out=out, model=model,
                  dtype=dtype, threads=threads)
        given = {"hf_max_prompts": hf_max_prompts, "batch_size": batch_size, "rate": rate, "repeats": repeats}
        kw.update({k: v for k, v in given.items() if v is not None})
        opts = BenchOptions.quick(**kw) if quick else BenchOptions(**kw)
    except ValueError as e:
        fail(str(e))
    from .models import ModelError
    try:
        result = run_bench(opts, status=lambda m: err.print(m, style="dim", highlight=False))
    except (ModelError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    typer.echo(markdown(result))
    err.print(f"wrote {result['json_path']}", highlight=False)


def main() -> None:  # pragma: no cover - console script indirection
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
