"""TransformersFallback: a ``Model`` for causal LMs transformers runs but the paged engine does not.

It runs transformers' own module tree with transformers' own KV cache, one
cache per live sequence, keyed by ``BatchSequence.key``, and one sequence at a
time (batch 1, no padding), exactly as ``generate`` runs a single prompt: the
cache ``generate`` would build (``_prepare_cache_for_generation``), an
all-ones attention mask over the cached and new tokens, and the new tokens'
positions. So any architecture that works with ``generate`` works here: learned
absolute positions (GPT-2), ALiBi, sliding windows, recurrent state. The engine
around it (scheduler, sampling, stop strings, logprobs, structured output,
abort, the front-ends) is unchanged.

What it gives up, and the notice says so: batching across sequences (each
sequence is its own forward) and the paged pool; and so prefix caching, which
shares pool blocks between sequences (``Engine`` turns it off for this model).
Memory stays bounded: ``spec.kv_pool`` is False, so the runner allocates no
pool, but the block manager still counts blocks of ``spec.kv_bytes_per_token``
(the K and V transformers' cache holds per token), and a sequence's cache lives
exactly while it holds blocks: ``release(key)`` when it finishes, is aborted or
is preempted; a recompute (``start == 0``) starts a fresh cache.

Refused, with a one-line reason (``UnsupportedModelError``): what cannot run at
all, i.e. a model with no language-model head, an encoder-decoder, an encoder
whose attention is bidirectional (a masked LM loaded as a causal LM), a model
whose forward takes no KV cache, or a config without the geometry that sizes
its cache. ``checkpoint_refusal`` says the same of a checkpoint dir before it
is loaded (remote code, unknown or non-causal model types).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from .attention import BatchSequence, PagedBatch
from .model_spec import ModelSpec
from .architectures import UnsupportedModelError

NOTICE = ("cbgen: model type {!r} runs on the transformers fallback (one sequence at a time, no paged KV, "
          "no prefix caching): slower than the paged engine")


def fallback_notice(model_type: str) -> str:
    """The one line a front-end prints on stderr when a model runs on the fallback."""
    return NOTICE.format(model_type)


def make_fallback(hf_model: Any, spec: ModelSpec | None = None) -> "TransformersFallback":
    """Wrap a loaded transformers causal LM (eval mode; dropout would corrupt decoding).

    Raises ``UnsupportedModelError`` (one line: what the model is and why it cannot
    run) for the cases in the module docstring.
    """
    c = getattr(hf_model, "config", None)
    name = f"model type {getattr(c, 'model_type', None)!r} ({type(hf_model).__name__})"
    if not _is_transformers_model(hf_model) or not hf_model.can_generate():
        raise UnsupportedModelError(f"{name} has no language-model head (transformers cannot generate "
                                    "with it); cbgen serves causal LMs")
    if getattr(c, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder: its decoder needs an encoder pass "
                                    "per input; cbgen serves decoder-only causal LMs")
    causal = [m.is_causal for m in hf_model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if causal and not any(causal):
        raise UnsupportedModelError(f"{name} attends both ways (is_causal=False in every attention layer: an "
                                    "encoder such as a masked LM, is_decoder=False); cbgen serves causal LMs")
    cache_arg = _cache_argument(hf_model)
    if cache_arg is None:
        raise UnsupportedModelError(f"{name}: its forward takes no KV cache (neither 'cache' nor "
                                    "'past_key_values'), so every token would recompute the whole sequence")
    if spec is None:
        text = c.get_text_config(decoder=True)
        try:
            spec = ModelSpec.from_config(text, dtype=str(hf_model.dtype).removeprefix("torch."),
                                         eos_token_ids=_eos_ids(hf_model))
        except ValueError as e:
            raise UnsupportedModelError(f"{name}: cannot size its KV cache ({e})") from e
    return TransformersFallback(hf_model.eval(), dataclasses.replace(spec, kv_pool=False), cache_arg)


class TransformersFallback:
    """``Model`` (model.py) over transformers' modules, one sequence at a time.

    ``forward(ids, positions, batch, keep)``: for each ``batch.sequences`` entry,
    in order, one forward of its slice ``ids[flat_start:flat_start + num_tokens]``
    as ``[1, n]`` on its own cache (a fresh one when ``start == 0``); the logits of
    the ``keep`` rows in that slice land at their index in ``keep``. Returns float
    ``[len(keep), vocab]`` in the model's logits dtype, or None when ``keep`` is
    empty. Raises RuntimeError if a sequence continues (``start > 0``) without a
    cache holding exactly ``start`` tokens (prefix caching on, or a missed release).

    ``release(key)``: forget ``key``'s cache (idempotent); the engine calls it when
    the sequence finishes, is aborted or is preempted.
    """

    def __init__(self, hf_model: Any, spec: ModelSpec, cache_arg: str = "cache") -> None:
        assert not spec.kv_pool, "the fallback keeps its own cache: the runner must allocate no pool"
        self.model = hf_model
        self.spec = spec
        self._cache_arg = cache_arg
        params = inspect.signature(hf_model.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_keep = "logits_to_keep" in params
        # As generate builds it (GenerationMixin._prepare_cache_for_generation); None: the model makes its own.
        supports_dynamic = getattr(hf_model, "_supports_default_dynamic_cache", lambda: True)()
        self._cache_config = hf_model.config.get_text_config(decoder=True) if supports_dynamic else None
        self._caches: dict[tuple[str, int], Any] = {}
        self._lengths: dict[tuple[str, int], int] = {}   # tokens in each cache

    # What the engine and runner read of a model.
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def notice(self) -> str:
        return fallback_notice(self.spec.architecture)

    @property
    def num_live_caches(self) -> int:
        return len(self._caches)

    def parameters(self) -> Iterator[torch.Tensor]:
        return self.model.parameters()

    def release(self, key: tuple[str, int]) -> None:
        self._caches.pop(key, None)
        self._lengths.pop(key, None)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch,
                keep: torch.Tensor) -> torch.Tensor | None:
        rows = keep.tolist()
        logits: torch.Tensor | None = None
        filled = 0
        for seq in batch.sequences:
            lo, hi = seq.flat_start, seq.flat_start + seq.num_tokens
            mine = [j for j, r in enumerate(rows) if lo <= r < hi]
            out = self._step(seq, ids[lo:hi], positions[lo:hi], [rows[j] - lo for j in mine])
            if mine:
                if logits is None:
                    logits = out.new_empty(len(rows), out.shape[-1])
                logits[mine] = out
                filled += len(mine)
        assert filled == len(rows), f"keep rows {rows} outside the scheduled sequences"
        return logits

    def _step(self, seq: BatchSequence, ids: torch.Tensor, positions: torch.Tensor,
              rows: list[int]) -> torch.Tensor:
        """One forward of one sequence's new tokens; the logits at ``rows`` (local), ``[len(rows), V]``."""
        key, start, n = seq.key, seq.start, seq.num_tokens
        if start == 0:
            cache = _new_cache(self._cache_config)
        else:
            cache = self._caches.get(key)
            if cache is None or self._lengths.get(key) != start:
                raise RuntimeError(f"transformers fallback: sequence {key} continues at position {start} but its "
                                   f"cache holds {self._lengths.get(key, 0)} tokens (prefix caching must be off)")
        want = torch.tensor(rows, dtype=torch.long, device=ids.device)
        kwargs: dict[str, Any] = {"input_ids": ids.unsqueeze(0), self._cache_arg: cache, "use_cache": True,
                                  "attention_mask": torch.ones(1, start + n, dtype=torch.long, device=ids.device)}
        if self._takes_positions:
            kwargs["position_ids"] = positions.unsqueeze(0)
        if self._takes_keep:
            kwargs["logits_to_keep"] = want   # only these rows go through the LM head
        out = self.model(**kwargs)
        self._caches[key] = _returned_cache(out)
        self._lengths[key] = start + n
        logits = out.logits[0]
        return logits if self._takes_keep else logits.index_select(0, want)


def checkpoint_refusal(path: Path) -> str | None:
    """Why the checkpoint dir ``path`` cannot run at all, read from its config.json before
    loading (one line), or None. None too when config.json is missing or unreadable:
    the loader then says what is wrong.

    Refused: a model type transformers does not ship (remote code from ``auto_map``,
    which cbgen never runs, or a transformers too old for it), an encoder-decoder,
    and a model type with no causal-LM class (``AutoModelForCausalLM`` has none).
    """
    try:
        c = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(c, dict):
        return None
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = c.get("model_type")
    if mt not in CONFIG_MAPPING_NAMES:
        if c.get("auto_map"):
            return (f"model type {mt!r} needs the checkpoint's own Python code (config.json auto_map); "
                    "cbgen runs only architectures transformers ships (no trust_remote_code)")
        return f"model type {mt!r} is unknown to transformers {transformers.__version__}"
    if c.get("is_encoder_decoder"):
        return (f"model type {mt!r} is an encoder-decoder: its decoder needs an encoder pass per input; "
                "cbgen serves decoder-only causal LMs")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"model type {mt!r} has no causal-LM class in transformers (AutoModelForCausalLM); not a text generator"
    return None


def _is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _cache_argument(model: Any) -> str | None:
    """The name the forward takes its KV cache by: 'cache' (transformers >= 5.2x), or the older
    'past_key_values' (still accepted, deprecated, where the model was renamed)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _new_cache(config: Any) -> Any:
    if config is None:
        return None
    from transformers import DynamicCache
    return DynamicCache(config=config)


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError("transformers fallback: the model returned no cache with use_cache=True")
    return cache


def _eos_ids(model: Any) -> tuple[int, ...]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return tuple(int(i) for i in ids)
