"""Chat-template controls: parsing per line (both formats), template checks at encode time,
--chat-template FILE, and the continue-final-message case end to end."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_tokenizer
from typer.testing import CliRunner

from cbgen.cli import app
from cbgen.config import SamplingParams
from cbgen.frontends.prompting import PromptError, encode, load_chat_template
from cbgen.io.chat_controls import ChatTemplateControls
from cbgen.io.records import InputError, InputRecord, parse_line

D = SamplingParams(max_new_tokens=8)
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"}]
# ChatML that reads tools and a thinking switch, as Qwen3-style templates do.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def cbgen_line(**fields):
    return parse_line(json.dumps({"id": "x", "messages": CHAT, **fields}), 3, D)


def openai_line(**body):
    return parse_line(json.dumps({"custom_id": "x", "body": {"messages": CHAT, **body}}), 3, D)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# ---- parsing ------------------------------------------------------------------

@pytest.mark.parametrize("make", [cbgen_line, openai_line])
def test_controls_are_read_at_top_level_and_in_the_body(make):
    r = make(continue_final_message=True, add_generation_prompt=False, chat_template_kwargs={"enable_thinking": False},
             tools=[TOOL])
    assert isinstance(r, InputRecord)
    c = r.chat_controls
    assert (c.continue_final_message, c.add_generation_prompt, c.chat_template_kwargs, c.tools) == (
        True, False, {"enable_thinking": False}, [TOOL])
    assert make().chat_controls is None  # no controls: the defaults


def test_continue_final_message_alone_turns_off_the_generation_prompt():
    c = cbgen_line(continue_final_message=True).chat_controls
    assert c.continue_final_message and not c.add_generation_prompt
    assert cbgen_line(add_generation_prompt=None).chat_controls is None  # null = not given


@pytest.mark.parametrize("fields, field, expected", [
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message", "together with"),
    ({"continue_final_message": "yes"}, "continue_final_message", "expected true or false"),
    ({"add_generation_prompt": 1}, "add_generation_prompt", "expected true or false"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs", "expected an object"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs", "expected an object"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools", "as its own field"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize", "reserved"),
    ({"tools": {"name": "f"}}, "tools", "expected a list of objects"),
    ({"tools": ["f"]}, "tools[0]", "expected an object"),
    ({"tool_choice": "required", "tools": [TOOL]}, "tool_choice", "does not force tool calls"),
    ({"chat_template": 3}, "chat_template", "expected a Jinja template string"),
    ({"documents": "d"}, "documents", "expected a list of objects"),
])
@pytest.mark.parametrize("make, prefix", [(cbgen_line, ""), (openai_line, "body.")])
def test_bad_controls_are_error_records_naming_the_field(make, prefix, fields, field, expected):
    r = make(**fields)
    assert isinstance(r, InputError) and r.field == prefix + field
    assert r.message.startswith(f"line 3: field '{prefix}{field}': ") and expected in r.message


def test_continuation_needs_a_final_assistant_message():
    r = parse_line(json.dumps({"messages": CHAT[:1], "continue_final_message": True}), 2, D)
    assert isinstance(r, InputError) and r.field == "continue_final_message" and "got role \"user\"" in r.message
    r = parse_line(json.dumps({"messages": [CHAT[0], {"role": "assistant", "content": " "}],
                               "continue_final_message": True}), 2, D)
    assert isinstance(r, InputError) and "non-empty" in r.message
    # --system is prepended; it never becomes the message to continue.
    r = parse_line(json.dumps({"messages": CHAT, "continue_final_message": True}), 2, D, system="Be brief.")
    assert r.messages[0]["role"] == "system" and r.chat_controls.continue_final_message


def test_controls_on_a_raw_prompt_are_refused():
    r = parse_line(json.dumps({"prompt": "Once", "add_generation_prompt": False}), 4, D)
    assert isinstance(r, InputError) and r.field == "add_generation_prompt" and "raw 'prompt'" in r.message
    r = parse_line(json.dumps({"custom_id": "c", "url": "/v1/completions",
                               "body": {"prompt": "Once", "chat_template_kwargs": {}}}), 4, D)
    assert isinstance(r, InputError) and r.field == "body.chat_template_kwargs"


def test_a_misspelt_control_is_an_error():
    r = cbgen_line(continue_final_mesage=True)
    assert isinstance(r, InputError) and "did you mean 'continue_final_message'" in r.message
    r = openai_line(add_generation_promt=False, user="u1")  # other body keys stay ignored
    assert isinstance(r, InputError) and r.field == "body.add_generation_promt"
    assert "did you mean 'body.add_generation_prompt'" in r.message
    # Dataset columns near a short control name stay ignored extra columns.
    r = cbgen_line(tool="hammer", document="a.txt")
    assert isinstance(r, InputRecord) and r.chat_controls is None


# ---- encoding -------------------------------------------------------------------

def test_continue_final_message_leaves_the_assistant_turn_open(tok):
    cont = encode(tok, messages=CHAT, controls=cbgen_line(continue_final_message=True).chat_controls)
    plain = encode(tok, messages=CHAT)
    text = tok.decode(cont)
    assert text.endswith("<|im_start|>assistant\nThe capital of France is")
    assert tok.decode(plain).endswith("The capital of France is<|im_end|>\n<|im_start|>assistant\n")
    no_gen = encode(tok, messages=CHAT[:1], controls=cbgen_line(add_generation_prompt=False).chat_controls)
    assert tok.decode(no_gen).endswith("<|im_end|>\n")


def test_controls_the_template_does_not_use_are_refused(tok):
    with pytest.raises(PromptError, match=r"field 'body.tools': the chat template does not use tools"):
        encode(tok, messages=CHAT, controls=openai_line(tools=[TOOL]).chat_controls)
    with pytest.raises(PromptError, match=r"field 'chat_template_kwargs.enable_thinking': .* no variable"):
        encode(tok, messages=CHAT, controls=cbgen_line(chat_template_kwargs={"enable_thinking": False}).chat_controls)
    with pytest.raises(PromptError, match=r"field 'documents'"):
        encode(tok, messages=CHAT, controls=cbgen_line(documents=[{"text": "d"}]).chat_controls)


def test_tools_and_kwargs_reach_a_template_that_uses_them(tok):
    c = cbgen_line(chat_template=TOOLS_TEMPLATE, tools=[TOOL],
                   chat_template_kwargs={"enable_thinking": False}).chat_controls
    text = tok.decode(encode(tok, messages=CHAT[:1], controls=c))
    assert '"get_weather"' in text and text.endswith("<think>\n\n</think>\n\n")
    # tool_choice "none" leaves the tools out of the prompt.
    c = cbgen_line(chat_template=TOOLS_TEMPLATE, tools=[TOOL], tool_choice="none").chat_controls
    assert "get_weather" not in tok.decode(encode(tok, messages=CHAT[:1], controls=c))


def test_a_bad_line_template_names_its_field(tok):
    c = ChatTemplateControls(chat_template="{% for m in messages %}", prefix="body.")
    with pytest.raises(PromptError, match=r"field 'body.chat_template': "):
        encode(tok, messages=CHAT, controls=c)


def test_no_chat_template_refuses_messages(tok):
    bare = build_tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(PromptError, match="no chat template"):
        encode(bare, messages=CHAT)
    # A line's own template is enough.
    assert encode(bare, messages=CHAT, controls=ChatTemplateControls(chat_template=TOOLS_TEMPLATE))


def test_load_chat_template_checks_the_file(tmp_path):
    good = tmp_path / "t.jinja"
    good.write_text(TOOLS_TEMPLATE)
    assert load_chat_template(str(good)) == TOOLS_TEMPLATE
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m }}\n")
    with pytest.raises(PromptError, match=r"bad.jinja.*line \d+: .*endfor"):
        load_chat_template(str(bad))
    with pytest.raises(PromptError, match="cannot read"):
        load_chat_template(str(tmp_path / "missing.jinja"))


# ---- cbgen run ------------------------------------------------------------------

def _run(args):
    return CliRunner().invoke(app, ["run", *args], catch_exceptions=False)


def test_run_honours_controls_and_the_chat_template_file(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(o) for o in [
        {"custom_id": "cont", "body": {"messages": CHAT, "continue_final_message": True,
                                        "add_generation_prompt": False}},
        {"custom_id": "control", "body": {"messages": CHAT}},
        {"id": "tools", "messages": CHAT[:1], "tools": [TOOL]},
        {"id": "both", "messages": CHAT, "continue_final_message": True, "add_generation_prompt": True},
    ]) + "\n")
    base = [str(src), "--model", str(tiny_model_dir), "--dtype", "float32", "-q", "-n", "3"]
    r = _run(base)
    assert r.exit_code == 1
    recs = {rec["id"]: rec for rec in map(json.loads, r.stdout.splitlines())}
    # The continuation ends at the open assistant text: no "<|im_end|>\n<|im_start|>assistant\n" after it.
    assert recs["cont"]["error"] is None and recs["control"]["error"] is None
    assert recs["control"]["usage"]["prompt_tokens"] > recs["cont"]["usage"]["prompt_tokens"]
    assert "field 'tools': the chat template does not use tools" in recs["tools"]["error"]
    assert "field 'continue_final_message'" in recs["both"]["error"]
    assert "field 'tools'" in r.stderr
    r = _run([*base, "--validate"])  # --validate (and --dry-run) apply the same checks
    assert r.exit_code == 1 and "2 valid, 2 invalid" in r.stderr and "field 'tools'" in r.stderr
    # --chat-template FILE applies to every line: now the tools line is served.
    tpl = tmp_path / "tools.jinja"
    tpl.write_text(TOOLS_TEMPLATE)
    recs = {rec["id"]: rec for rec in map(json.loads, _run([*base, "--chat-template", str(tpl)]).stdout.splitlines())}
    assert recs["tools"]["error"] is None and recs["tools"]["usage"]["prompt_tokens"] > 20
    r = _run([*base, "--chat-template", str(tmp_path / "nope.jinja")])
    assert r.exit_code == 2 and "--chat-template" in r.stderr and r.stdout == ""


@pytest.mark.e2e
def test_continue_final_message_case_on_the_embedded_model(tmp_path):
    """The shared case, with its own input: the continuation completes the sentence, the control
    line (template closes the assistant turn) starts a new answer."""
    src = tmp_path / "cont.jsonl"
    chat = [{"role": "user", "content": "What is the capital of Italy?"},
            {"role": "assistant", "content": "The capital of Italy is"}]
    src.write_text(json.dumps({"custom_id": "cont", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": chat, "continue_final_message": True,
                                        "add_generation_prompt": False, "max_tokens": 4, "temperature": 0}})
                   + "\n" + json.dumps({"id": "control", "messages": chat, "max_new_tokens": 4}) + "\n")
    r = _run([str(src), "-q", "--format", "openai"])
    assert r.exit_code == 0, r.stderr
    out = {rec["custom_id"]: rec for rec in map(json.loads, r.stdout.splitlines())}
    cont = out["cont"]["response"]["body"]["choices"][0]["message"]["content"]
    control = out["control"]["response"]["body"]["choices"][0]["message"]["content"]
    assert cont.lstrip().startswith("Rome"), cont
    assert not control.lstrip().startswith("Rome"), control
