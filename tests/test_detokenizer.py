"""Incremental detokenisation with the real (byte-level BPE) tiny tokenizer, and stop strings."""

from __future__ import annotations

import pytest

from cbgen.engine.detokenizer import Detokenizer

# Characters the tiny BPE never saw as a whole: they are split into byte tokens.
MULTIBYTE = "Café déjà vu — naïve 日本語 and 🎉🚀 done. The capital of France is Paris."


@pytest.fixture(scope="module")
def tok(tiny_loaded):
    return tiny_loaded.tokenizer


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream(detok: Detokenizer, ids: list[int], per_step: int = 1) -> tuple[list[str], str | None]:
    """Feed ``ids`` ``per_step`` at a time, as the engine does; returns the deltas and the stop hit."""
    deltas = []
    for i in range(0, len(ids), per_step):
        stop = detok.add(ids[i:i + per_step])
        if stop is not None:
            deltas.append(detok.delta(True))
            return deltas, stop
        deltas.append(detok.delta(False))
    detok.finish_text()
    deltas.append(detok.delta(True))
    return deltas, None


def test_multibyte_characters_are_split_across_tokens(tok):
    ids = tok.encode(MULTIBYTE)
    pieces = [decode(tok, [i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs a character split across tokens"


@pytest.mark.parametrize("per_step", [1, 2, 3])
def test_deltas_concatenate_to_the_full_decode(tok, per_step):
    ids = tok.encode(MULTIBYTE)
    deltas, stop = stream(Detokenizer(tok), ids, per_step)
    assert stop is None
    assert "".join(deltas) == decode(tok, ids) == MULTIBYTE
    assert not any("\ufffd" in d for d in deltas), "a partial character is never streamed"


def test_the_decode_window_slides(tok):
    ids = tok.encode(MULTIBYTE * 3)
    d = Detokenizer(tok)
    for t in ids:
        d.add([t])
        # Only the tokens of the last (possibly incomplete) character or two are re-decoded.
        assert len(ids[d.prefix_offset:d.read_offset]) <= 8 and d.prefix_offset <= d.read_offset
    assert d.prefix_offset > len(ids) // 2


def test_special_tokens_are_skipped(tok):
    ids = tok.encode("Hi there") + [tok.eos_token_id]
    deltas, _ = stream(Detokenizer(tok), ids)
    assert "".join(deltas) == "Hi there"


@pytest.mark.parametrize("text", ["ok 🎉", "naïve 日本", "é", "x 🎉🚀"])
def test_a_character_cut_short_at_the_end_is_dropped_not_replaced(tok, text):
    full = tok.encode(text)
    for cut in range(1, len(full)):
        ids = full[:cut]                     # max_new_tokens may stop after any of these tokens
        lossy = decode(tok, ids)
        d = Detokenizer(tok)
        deltas, _ = stream(d, ids)
        assert not d.text.endswith("\ufffd") and "".join(deltas) == d.text
        assert d.text == lossy.removesuffix("\ufffd") and text.startswith(d.text)
        assert d.token_ids == ids            # every token is kept (usage counts them)


def test_invalid_bytes_before_the_cut_stay_replaced(tok):
    # A lone continuation byte (invalid, never completed) then a cut-short character: only
    # the incomplete tail goes.
    cont = next(i for i in range(tok.vocab_size) if decode(tok, [i]) == "\ufffd"
                and decode(tok, [i] + tok.encode("a")) == "\ufffda")
    ids = tok.encode("a") + [cont] + tok.encode("b 🎉")[:-1]
    d = Detokenizer(tok)
    stream(d, ids)
    assert d.text == "a\ufffdb "


def test_stop_string_across_tokens_is_cut_and_held_back(tok):
    text = "The capital of France is Paris. Berlin is the capital of Germany."
    ids = tok.encode(text)
    stop = "France is"
    assert not any(stop in decode(tok, [i]) for i in ids), "the stop string spans several tokens"
    start = text.index(stop)
    d = Detokenizer(tok, stop=(stop, "xyz"))
    streamed = ""
    for i in range(len(ids)):
        hit = d.add(ids[i:i + 1])
        if hit:
            break
        streamed += d.delta(False)
        assert len(streamed) <= start, "nothing at or after the stop string's start is streamed"
        assert text.startswith(streamed)
    assert hit == stop
    streamed += d.delta(True)
    assert streamed == d.text == "The capital of "


def test_stop_string_included_when_asked(tok):
    text = "Paris is the capital of France. Rome is the capital of Italy."
    ids = tok.encode(text)
    d = Detokenizer(tok, stop=("capital of I", "capital of F"), include_stop=True)
    deltas, stop = stream(d, ids)
    assert stop == "capital of F"
    assert "".join(deltas) == "Paris is the capital of F"


def test_earliest_stop_wins_and_text_without_stop_is_released(tok):
    text = "one two three four five"
    ids = tok.encode(text)
    d = Detokenizer(tok, stop=("four", "two three"))
    deltas, stop = stream(d, ids)
    assert stop == "two three" and "".join(deltas) == "one "
    d = Detokenizer(tok, stop=("zzz",))
    deltas, stop = stream(d, ids)
    assert stop is None and "".join(deltas) == text
    assert deltas[-1] == text[-2:], "the last len(stop) - 1 chars are held back until the end"


def test_stop_string_split_inside_a_multibyte_character(tok):
    text = "naïve 日本語 done"
    ids = tok.encode(text)
    d = Detokenizer(tok, stop=("日本",))
    deltas, stop = stream(d, ids)
    assert stop == "日本" and "".join(deltas) == "naïve "


def test_stub_tokenizer_joining_ids():
    class Stub:
        def decode(self, ids, **_):
            return "".join(f"<{i}>" for i in ids)

    d = Detokenizer(Stub(), stop=("<3><4>",))
    deltas, stop = stream(d, [1, 2, 3, 4, 5])
    assert stop == "<3><4>" and "".join(deltas) == "<1><2>"


@pytest.mark.e2e
def test_real_model_tokenizer_streams_multibyte_text(embedded_model):
    tok = embedded_model.tokenizer
    text = "Grüße aus Köln — 東京タワー 🎉🚀 naïve café. Done."
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in decode(tok, [i]) for i in ids), "some character is split across tokens"
    deltas, stop = stream(Detokenizer(tok), ids)
    assert stop is None and "".join(deltas) == decode(tok, ids) == text
    assert not any("\ufffd" in d for d in deltas)
    deltas, stop = stream(Detokenizer(tok, stop=("タワ",)), ids)
    assert stop == "タワ" and "".join(deltas) == "Grüße aus Köln — 東京"


def test_engine_outputs_cut_by_max_new_tokens_never_end_in_a_replacement_char(sharp):
    # Sampled tokens of the sharpened tiny model are often single bytes of multi-byte
    # characters, so some generations stop inside one (checked below, so the test bites).
    from cbgen.config import EngineConfig, SamplingParams
    from cbgen.engine.engine import Engine

    tok = sharp.tokenizer
    eng = Engine.from_loaded(sharp, EngineConfig(max_num_seqs=32))
    prompt = tok.encode(MULTIBYTE)
    params = [SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=1.0, seed=s)
              for s in range(12) for n in (3, 7)]
    outs = eng.generate([prompt] * len(params), params)
    cut = 0
    for o, p in zip(outs, params):
        lossy = decode(tok, o.token_ids)
        cut += lossy.endswith("\ufffd")
        assert len(o.token_ids) == o.metrics.num_generated_tokens == p.max_new_tokens  # usage counts them all
        assert o.text == lossy.removesuffix("\ufffd") and not o.text.endswith("\ufffd")
    assert cut, "no generation stopped inside a character; the test needs one"
