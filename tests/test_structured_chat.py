"""`cbgen chat`'s /set json on|off and /set schema FILE|off, on the tiny model."""

from __future__ import annotations

import json

import pytest
from test_chat import pump

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.engine import Engine
from cbgen.frontends.chat_commands import handle
from cbgen.frontends.chat_session import ChatSession
from cbgen.frontends.driver import Driver

SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}}, "required": ["mood"],
          "additionalProperties": False}


@pytest.fixture
def chat(sharp):
    eng = Engine.from_loaded(sharp, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256))
    with Driver(eng) as driver:
        s = ChatSession(driver, sharp.tokenizer, SamplingParams(max_new_tokens=24), model_name="tiny")
        yield s
        s.close()


def test_set_json_and_schema_constrain_new_prompts(chat, tmp_path):
    assert handle(chat, "/set json") == "json: off"
    assert handle(chat, "/set json maybe") == "json: 'maybe' is not on or off"
    assert handle(chat, "/set json on") == "new prompts answer with a JSON object"
    handle(chat, "first")
    f = tmp_path / "mood.json"
    f.write_text(json.dumps(SCHEMA))
    assert handle(chat, f"/set schema {f}") == f"new prompts answer with JSON matching {f}"
    handle(chat, "second")
    assert handle(chat, "/set json off") == "output constraint off for new prompts"
    handle(chat, "third")
    pump(chat, lambda: not chat.running())
    first, second, third = (chat.seqs[n] for n in (1, 2, 3))
    assert first.structured.kind == "json_object" and first.text.startswith("{")
    assert second.structured.kind == "json_schema" and second.text.startswith('{"mood": "')
    if second.output.structured_complete:
        assert json.loads(second.text)["mood"] in ("happy", "sad")
    assert third.structured is None and third.output.structured_complete is None


def test_bad_schema_file_is_one_line_and_keeps_the_old_setting(chat, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "nope"}))
    reply = handle(chat, f"/set schema {bad}")
    assert reply.startswith("schema: field '--json-schema': invalid JSON schema: ") and "\n" not in reply
    assert handle(chat, f"/set schema {tmp_path / 'missing.json'}").startswith("schema: --json-schema ")
    assert chat.structured is None
