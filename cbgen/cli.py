"""Typer app: parses options, builds config + front-end; nothing else.

Results go to stdout, status and errors to stderr. User errors are one line
(``error: ...``) with exit code 2; a run with failed lines exits 1.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .config import EngineConfig, ModelConfig, SamplingParams
from .frontends.option_checks import kv_tokens, option_error, output_problem

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Batch and interactive LLM generation on a continuous-batching engine.")
# Not a terminal (a log file, a pipe): every status line stays one line (grep, tail),
# instead of Rich's word-wrap at its default 80 columns.
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
_STARTED = time.monotonic()   # --dry-run counts start-up from here

ModelOpt = typer.Option(None, "--model", "-m", help="Local HF model dir, a .gguf file, or org/name in the "
                        "local HF cache. Default: the embedded SmolLM2-135M-Instruct.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (auto: bf16 where the CPU has "
                        "native bf16).")
ThreadsOpt = typer.Option(None, "--threads", help="Torch threads (default: all cores).")
ImplOpt = typer.Option("auto", "--impl", help="How the model runs: auto | native (cbgen's own forward) | "
                       "transformers (its modules, paged attention). auto: the fastest that serves it.")
QuantizeOpt = typer.Option("none", "--quantize", help="none | int8 | auto: weight-only int8 projections, one scale "
                           "per output channel (faster decode at small batch; quality cost in README). auto: int8 "
                           "where the native int8 GEMM runs and the weights outgrow the CPU cache.")
DeterministicOpt = typer.Option(False, "--deterministic", help="Batch-invariant: a greedy or seeded output "
                                "depends only on its prompt and params, not on what else runs (costs speed at "
                                "small batch; README).")


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(model: str | None, dtype: str, threads: int | None, chat_template: str | None = None,
          impl: str = "auto", quantize: str = "none", quiet: bool = False, deterministic: bool = False):
    """Load the model, turning every expected failure into a one-line error. ``chat_template``
    (Jinja source) replaces the tokenizer's for the whole process; ``quiet`` drops the load's
    status lines (errors still print); ``deterministic``: the engine will be (--quantize auto)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never a network hang
    from .compute import compute_thread
    from .models import ModelError, load_model
    try:
        try:
            cfg = ModelConfig(model=model, dtype=dtype, threads=threads, impl=impl, quantize=quantize)
        except ValueError as e:
            fail(option_error(e))
        # On the compute thread, where the engine will step: one OpenMP team (cbgen/compute.py).
        # soft_wrap: one status, one line, also when stderr is a file (grep, logs).
        status = (lambda msg: None) if quiet else (lambda msg: err.print(msg, style="dim", highlight=False,
                                                                          soft_wrap=True))
        loaded = compute_thread().call(load_model, cfg, status=status, deterministic=deterministic)
    except (ModelError, ValueError) as e:
        fail(str(e))
    if chat_template is not None:
        loaded.tokenizer.chat_template = chat_template
    return loaded


def _engine_config(max_num_seqs: int | None, max_batched_tokens: int | None, kv_cache_gb: float, prefix_cache: bool,
                   attention: str = "auto", deterministic: bool = False,
                   num_scheduler_steps: int = EngineConfig.num_scheduler_steps) -> EngineConfig:
    """Validated before the model loads, so a bad option fails in milliseconds. Every running
    sequence needs a token of the step's budget, so each default follows the other when given:
    ``max_batched_tokens`` None is 512, raised to ``max_num_seqs`` (``--max-num-seqs 1000``
    alone works); ``max_num_seqs`` None is 256, lowered to ``max_batched_tokens``
    (``--max-batched-tokens 128`` alone works)."""
    if max_batched_tokens is None:   # every running sequence needs a token of the budget
        max_batched_tokens = max(EngineConfig.max_num_batched_tokens, max_num_seqs or 0)
    if max_num_seqs is None:
        max_num_seqs = min(EngineConfig.max_num_seqs, max_batched_tokens) if max_batched_tokens >= 1 \
            else EngineConfig.max_num_seqs
    try:
        return EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
                            kv_cache_gb=kv_cache_gb, enable_prefix_caching=prefix_cache, attention=attention,
                            deterministic=deterministic, num_scheduler_steps=num_scheduler_steps)
    except ValueError as e:
        fail(option_error(e))


def _engine(loaded, cfg: EngineConfig):
    from .compute import compute_thread
    from .engine.engine import Engine
    from .engine.architectures import UnsupportedModelError
    try:
        engine = compute_thread().call(Engine.from_loaded, loaded, cfg)
    except (UnsupportedModelError, ValueError) as e:
        fail(str(e))
    if engine.notice:   # e.g. the transformers fallback: a slower path, said once
        err.print(escape(engine.notice), style="yellow", highlight=False, soft_wrap=True)
    # torch + transformers leave ~1M tracked objects; without this the first full
    # collection lands in an early step (~0.2 s, a tenth of the cold start).
    gc.freeze()
    return engine


def _chat_template(path: str | None) -> str | None:
    """The Jinja source of ``--chat-template FILE``, checked before the model loads."""
    from .frontends.prompting import PromptError, load_chat_template
    try:
        return load_chat_template(path) if path is not None else None
    except PromptError as e:
        fail(str(e))


def _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, n) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                              stop=tuple(stop or ()), n=n)
    except ValueError as e:
        fail(option_error(e))


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
    impl: str = ImplOpt,
    quantize: str = QuantizeOpt,
    fmt: str = typer.Option("jsonl", "--format", help="jsonl | openai (OpenAI Batch output lines) | text."),
    text: bool = typer.Option(False, "--text", help="Print just the generated text (same as --format text)."),
    order: Optional[str] = typer.Option(None, "--order", help="finish (default for stdin) | input (default for files)."),
    resume: bool = typer.Option(False, "--resume", help="Skip ids already in --output and append the rest."),
    validate: bool = typer.Option(False, "--validate", help="Check inputs (parsing, templates, lengths); generate nothing."),
    dry_run: bool = typer.Option(False, "--dry-run", help="--validate, plus token counts, the longest prompts and "
                                 "an ETA from a probe of this machine (15 s, then up to 90 s until 48 sampled answers end); generate nothing."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for chat inputs that have none."),
    template: Optional[str] = typer.Option(None, "--template", help="Table inputs: the prompt from each row's "
                                           "columns, Python format ('Summarize: {text}') or Jinja ('{{ text }}')."),
    template_format: str = typer.Option("auto", "--template-format",
                                        help="auto (Jinja iff the template has {{, {% or {#) | python | jinja."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="Table inputs: a raw prompt column."),
    messages_column: Optional[str] = typer.Option(None, "--messages-column", help="Table inputs: a chat column."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Table inputs: the id column (default: row number)."),
    row_group_size: int = typer.Option(1000, "--row-group-size", help="Table outputs: rows per row group, and "
                                       "per crash-safe part (a part is also written every 30 s)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", metavar="FILE",
                                                help="Jinja chat template for every line, instead of the model's."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    samples: int = typer.Option(1, "--samples", help="Samples per prompt (n)."),
    logprobs: bool = typer.Option(False, "--logprobs", help="Log-probability of each generated token."),
    top_logprobs: Optional[int] = typer.Option(None, "--top-logprobs",
                                               help="And the K most likely tokens at each (0-20; implies --logprobs)."),
    prompt_logprobs: Optional[int] = typer.Option(None, "--prompt-logprobs",
                                                  help="Logprobs of the prompt tokens, with K alternatives (0-20)."),
    json_mode: bool = typer.Option(False, "--json", help="Constrain outputs to a JSON object (needs cbgen\\[structured])."),
    json_schema: Optional[str] = typer.Option(None, "--json-schema", help="Constrain outputs to this JSON schema file."),
    regex: Optional[str] = typer.Option(None, "--regex", help="Constrain outputs to match this regex."),
    choice: Optional[str] = typer.Option(None, "--choice", help="Constrain outputs to one of these labels: a,b,c."),
    grammar: Optional[str] = typer.Option(None, "--grammar", help="Constrain outputs to this Lark (or GBNF) grammar file."),
    max_num_seqs: Optional[int] = typer.Option(
        None, "--max-num-seqs", show_default=False,
        help=f"Sequences decoding at once \\[default: {EngineConfig.max_num_seqs}, or --max-batched-tokens if lower]."),
    max_batched_tokens: Optional[int] = typer.Option(
        None, "--max-batched-tokens", show_default=False,
        help=f"Token budget of one step \\[default: {EngineConfig.max_num_batched_tokens}, or --max-num-seqs if "
             "higher]."),
    kv_cache_gb: float = typer.Option(EngineConfig.kv_cache_gb, "--kv-cache-gb", help="Memory for the KV cache pool."),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache"),
    attention: str = typer.Option("auto", "--attention",
                                  help="Decode attention: auto | native (C kernel, built once) | torch."),
    deterministic: bool = DeterministicOpt,
    num_scheduler_steps: int = typer.Option(
        EngineConfig.num_scheduler_steps, "--num-scheduler-steps",
        help="1-256: greedy decode steps run in one native call while at most ~8 sequences run, all greedy, "
             "and no waiting request has a free slot (same tokens, bursts of this many; 1: off)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no summary on stderr."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Live view on stderr (default: when stderr is a terminal)."),
    use_ray: bool = typer.Option(False, "--ray", help="Run on the Ray cluster at $RAY_ADDRESS, or a local Ray "
                                 "instance (needs cbgen\\[ray])."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers, one engine each (default: one per node)."),
    cpus_per_worker: Optional[int] = typer.Option(None, "--cpus-per-worker",
                                                  help="CPUs (torch threads) per Ray worker (default: a node's cores)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: only the inputs whose id hashes to shard I "
                                        "of N (0-based; for job arrays; see README)."),
) -> None:
    """Generate for every line of INPUTS; one JSONL record per line as it finishes."""
    from .frontends.run import BatchRun, RunOptions
    if text and fmt not in ("jsonl", "text"):
        fail(f"--text is --format text; not with --format {fmt}")
    if validate and dry_run:
        fail("--validate and --dry-run: choose one (--dry-run validates too)")
    if text:
        fmt = "text"
    from .frontends.table_plan import TABLE_FMTS, output_format, plan_tables
    try:
        fmt = output_format(output, fmt)
    except ValueError as e:
        fail(str(e))
    if fmt not in ("jsonl", "openai", "text", *TABLE_FMTS):
        fail(f"--format {fmt!r}: expected jsonl, openai, text, parquet, csv or tsv")
    if fmt in TABLE_FMTS and order == "finish":
        fail(f"--order finish: a {fmt} output is written in input order")
    order = order or ("finish" if "-" in inputs and fmt not in TABLE_FMTS else "input")
    if order not in ("finish", "input"):
        fail(f"--order {order!r}: expected finish or input")
    if resume and not output:
        fail("--resume needs --output FILE")
    from .io.reader import binary_reason
    from .io.tables import table_kind
    for path in inputs:
        if path != "-" and not os.path.isfile(path) and not os.path.isdir(path):
            fail(f"input {path!r}: no such file")
        if path != "-" and table_kind(path) is None and os.path.isfile(path) and (why := binary_reason(path)):
            fail(why)
    if output and (why := output_problem(output, inputs, [chat_template, json_schema, grammar, model])):
        fail(why)
    try:
        tables = plan_tables(inputs, fmt=fmt, template=template, template_format=template_format,
                             prompt_column=prompt_column, messages_column=messages_column, id_column=id_column,
                             samples=samples, part_rows=row_group_size)
    except (ValueError, OSError) as e:
        fail(str(e))
    shard_spec = _shard(shard) if shard is not None else None
    pool_opts = _ray_options(workers, cpus_per_worker) if use_ray else None
    if not use_ray and (workers or cpus_per_worker):
        fail("--workers and --cpus-per-worker need --ray")
    defaults = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, samples)
    try:
        from .io.logprob_fields import cli_defaults
        defaults = cli_defaults(defaults, logprobs, top_logprobs, prompt_logprobs)
    except ValueError as e:
        fail(str(e))
    structured = _structured(json_mode, json_schema, regex, choice, grammar)
    cfg = _engine_config(max_num_seqs, max_batched_tokens, kv_cache_gb, not no_prefix_cache, attention, deterministic,
                         num_scheduler_steps)
    loaded = _load(model, dtype, threads, _chat_template(chat_template), impl, quantize, quiet=quiet,
                   deterministic=deterministic)
    if validate:
        from .frontends.validate import validate_inputs
        raise typer.Exit(validate_inputs(inputs, loaded, defaults, system, err, tables.spec, kv_tokens(loaded, cfg)))
    opts = RunOptions(inputs=inputs, output=output, fmt=fmt, order=order, resume=resume, system=system,
                      defaults=defaults, quiet=quiet, progress=progress, model_name=loaded.name, tables=tables,
                      shard=shard_spec, structured=structured)
    from .io.resume import ResumeError
    if pool_opts is not None and not dry_run:
        try:
            raise typer.Exit(_run_on_ray(loaded, dtype, cfg, pool_opts, opts, model is not None))
        except ResumeError as e:
            fail(str(e))
    engine = _engine(loaded, cfg)
    if structured is not None:
        try:  # a bad default would fail every line: say so once, before the run
            engine.grammars.compile(structured)
        except ValueError as e:
            fail(str(e).replace("field '", "option '", 1))
    if dry_run:
        from .frontends.dryrun import dry_run as dry_run_inputs
        raise typer.Exit(dry_run_inputs(inputs, loaded, engine, defaults, system, err,
                                        startup_s=time.monotonic() - _STARTED, spec=tables.spec))
    try:
        code = BatchRun(engine, loaded.tokenizer, opts, err).run()
    except ResumeError as e:
        fail(str(e))
    raise typer.Exit(code)


def _shard(spec: str):
    from .io.shard import Shard
    try:
        return Shard.parse(spec)
    except ValueError as e:
        fail(str(e))


def _ray_options(workers: int | None, cpus_per_worker: int | None):
    """Checked before the model loads: Ray installed, counts valid."""
    from .frontends.ray_pool import PoolOptions, RayUnavailable, import_ray
    try:
        import_ray()
        return PoolOptions(workers=workers, cpus_per_worker=cpus_per_worker)
    except (RayUnavailable, ValueError) as e:
        fail(str(e))


def _run_on_ray(loaded, dtype: str, cfg: EngineConfig, pool_opts, opts, named: bool) -> int:
    """``cbgen run --ray``: this process reads, tokenizes and writes; the workers generate."""
    from .frontends.ray_pool import PoolError, RayPool
    from .frontends.run import BatchRun
    # Workers load by absolute path (their cwd differs); the driver keeps only the tokenizer.
    model_cfg = ModelConfig(model=os.path.abspath(loaded.origin) if named else None, dtype=dtype,
                            impl=loaded.impl, quantize=loaded.quantize)
    loaded.model = None
    gc.collect()
    pool = RayPool(model_cfg, cfg, pool_opts, status=lambda m: err.print(m, style="dim", highlight=False))
    try:
        try:
            pool.connect()
        except PoolError as e:
            fail(str(e))
        return BatchRun(None, loaded.tokenizer, opts, err, backend=pool).run()
    finally:
        pool.close()


@app.command()
def merge(
    outputs: list[str] = typer.Argument(..., help="Output files of the shards (cbgen JSONL or OpenAI format)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Merged file (default: stdout)."),
    inputs: Optional[list[str]] = typer.Option(None, "--input", "-i", help="The run's inputs (repeatable, in "
                                               "order): gives input order and checks that no id is missing."),
) -> None:
    """Merge shard outputs into one, in input order; name any missing or duplicate ids (exit 1)."""
    if output and (why := output_problem(output, [*outputs, *(inputs or ())])):
        fail(why)
    from .frontends.merge import run_merge
    raise typer.Exit(run_merge(outputs, output, inputs, err))


@app.command()
def info(model: Optional[str] = ModelOpt, dtype: str = DtypeOpt, threads: Optional[int] = ThreadsOpt,
         impl: str = ImplOpt, quantize: str = QuantizeOpt) -> None:
    """Show what would be loaded: path, architecture, parameters, dtype, context, template."""
    from .models import model_info
    loaded = _load(model, dtype, threads, impl=impl, quantize=quantize)
    from .compute import compute_thread
    for k, v in compute_thread().call(model_info, loaded).items():   # torch threads as the engine sees them
        typer.echo(f"{k:<18} {v}")


cache_app = typer.Typer(no_args_is_help=True, help="GGUF conversions in the cache ($CBGEN_CACHE, else "
                        "~/.cache/cbgen): list, remove, prune.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls() -> None:
    """Each conversion (model, dtype, size, created, whether its GGUF is still there unchanged), then the kernel dir."""
    from .models.cache import ls_lines
    for line in ls_lines():
        typer.echo(line)


@cache_app.command("rm")
def cache_rm(names: Optional[list[str]] = typer.Argument(None, help="A model name (all its dtypes) or a dir "
                                                         "name from `cbgen cache ls`."),
             all_: bool = typer.Option(False, "--all", help="Every conversion, and stale temp dirs.")) -> None:
    """Remove conversions; the next load of their GGUF converts it again."""
    from .models import cache
    if bool(names) == all_:
        fail("give NAME... or --all")   # a usage error: exit 2, as everywhere
    try:
        for line in cache.rm(names or [], everything=all_):
            typer.echo(line)
    except LookupError as e:
        fail(str(e.args[0]), code=1)
    except OSError as e:
        fail(f"cannot remove {getattr(e, 'filename', '') or 'a conversion'}: {e.strerror or e}", code=1)


@cache_app.command("prune")
def cache_prune() -> None:
    """Remove conversions whose GGUF is gone or changed or whose format is old, and stale temp dirs."""
    from .models import cache
    try:
        removed = cache.prune()
    except OSError as e:
        fail(f"cannot prune {cache.gguf_dir()}: {e}", code=1)
    for path, reason in removed:
        typer.echo(f"removed {reason} ({path.name})")


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    impl: str = ImplOpt,
    quantize: str = QuantizeOpt,
    system: Optional[str] = typer.Option(None, "--system", help="System message for new conversations."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", metavar="FILE",
                                                help="Jinja chat template instead of the model's."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.7, "--temperature", "-t"),
    top_p: float = typer.Option(0.9, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs"),
    deterministic: bool = DeterministicOpt,
    json_log: Optional[str] = typer.Option(None, "--json-log", help="Append every prompt and answer to FILE "
                                           "as `cbgen run` JSONL records, each as it finishes."),
) -> None:
    """Interactive REPL: every prompt you submit joins the running batch. With stdin a pipe
    or a file, each line is a prompt (or a /command); answers go to stdout in input order."""
    from .frontends.chat import run_chat
    defaults = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, None, 1)
    cfg = _engine_config(max_num_seqs, max(256, max_num_seqs), EngineConfig.kv_cache_gb, True,
                         deterministic=deterministic)
    if json_log:
        try:   # before the model loads: a typo'd directory fails in milliseconds
            open(json_log, "a", encoding="utf-8").close()
        except OSError as e:
            fail(f"--json-log {json_log!r}: cannot open: {e.strerror or e}")
    loaded = _load(model, dtype, threads, _chat_template(chat_template), impl, quantize, deterministic=deterministic)
    engine = _engine(loaded, cfg)
    raise typer.Exit(run_chat(engine, loaded, defaults, system=system, json_log=json_log))


def _int_item(option: str, x: str) -> int:
    try:
        return int(x)
    except ValueError:
        raise ValueError(f"{option}: {x!r} is not an integer") from None


@app.command()
def bench(
    prompts: str = typer.Option("../shared/bench/prompts-dev.jsonl", "--prompts",
                                help="JSONL prompt file (relative paths from the current dir)."),
    workloads: str = typer.Option("uniform,real,arrivals,concurrency,busy,coldstart", "--workloads",
                                  help="Comma list of uniform, real, arrivals, concurrency, busy, coldstart."),
    systems: str = typer.Option("hf,static,generate_batch,cbgen", "--systems",
                                help="Comma list of hf, static, generate_batch, cbgen-torch, cbgen-direct, cbgen, "
                                     "llama-server, llama-bench (cbgen-torch: without its native kernel and "
                                     "forward, for A/B; cbgen-direct: Engine.generate without the Driver, a "
                                     "diagnostic; llama-*: llama.cpp from $CBGEN_LLAMACPP_BIN or "
                                     "~/.cache/cbgen-bench/llama.cpp/build/bin, skipped with a note if absent)."),
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
    gguf: Optional[list[str]] = typer.Option(None, "--gguf", help="GGUF for llama.cpp (repeatable or a comma "
                                             "list; default: the GGUF the model resolves to)."),
    llamacpp_np: Optional[str] = typer.Option(None, "--llamacpp-np",
                                              help="llama-server -np values, one server each (default "
                                                   "1,4,16,64; 1,4 with --quick)."),
    llamacpp_bf16: bool = typer.Option(False, "--llamacpp-bf16", help="Also run llama.cpp on a BF16 GGUF "
                                       "requantized from the first (llama-quantize, cached)."),
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Throughput and latency on one prompt file: HF generate, HF static batching, generate_batch, cbgen, llama.cpp."""
    from .bench import BenchOptions, run_bench
    from .bench.report import markdown
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    if not os.path.isfile(prompts):
        fail(f"--prompts {prompts!r}: no such file (the default is relative to the repo root)")
    try:
        kw = dict(prompts=prompts, workloads=split(workloads), systems=split(systems), out=out, model=model,
                  dtype=dtype, threads=threads)
        given = {"hf_max_prompts": hf_max_prompts, "batch_size": batch_size, "rate": rate, "repeats": repeats,
                 "gguf": split(",".join(gguf)) if gguf else None, "llamacpp_bf16": llamacpp_bf16 or None,
                 "llamacpp_np": tuple(_int_item("--llamacpp-np", x) for x in split(llamacpp_np))
                 if llamacpp_np else None}
        kw.update({k: v for k, v in given.items() if v is not None})
        opts = BenchOptions.quick(**kw) if quick else BenchOptions(**kw)
    except ValueError as e:
        fail(str(e))
    from .bench.llamacpp import LlamaCppError
    from .models import ModelError
    # SIGTERM (kill, timeout) unwinds like Ctrl-C, so a llama-server the bench started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        result = run_bench(opts, status=lambda m: err.print(m, style="dim", highlight=False))
    except (ModelError, FileNotFoundError, ValueError, LlamaCppError) as e:
        fail(str(e))
    typer.echo(markdown(result))
    err.print(f"wrote {result['json_path']}", highlight=False)


def main() -> None:
    """The console script. A value Click cannot parse or an unknown option is one line on
    stderr with exit code 2, like every other usage error here, instead of Typer's boxed
    panel wrapped at 80 columns (``Invalid value for '--max-batched-tokens': ...``)."""
    # Click's base exception, wherever this Typer keeps Click (its own copy since 0.20-ish).
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = app(standalone_mode=False, prog_name="cbgen")
    except click_exception as e:
        if type(e).__name__ == "NoArgsIsHelpError":   # `cbgen` or `cbgen cache` alone: the help (exit 2)
            e.show()
        else:
            where = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) is not None else ""
            err.print(f"[bold red]error:[/] {escape(where + e.format_message())}", highlight=False, soft_wrap=True)
        code = e.exit_code
    except typer.Abort:   # Ctrl-C or EOF at a Click prompt
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
