"""Turn an input's prompt or messages into token ids. No torch.

Messages go through the chat template with the line's ``ChatTemplateControls``.
Template-dependent checks live here, where the template is known: ``tools``,
``documents`` and every ``chat_template_kwargs`` key must be variables the
template reads, else the control would be silently ignored, so it is a
``PromptError`` naming the field.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..io.chat_controls import DEFAULT_CONTROLS, ChatTemplateControls


class PromptError(ValueError):
    """The prompt cannot be encoded (e.g. messages for a model with no chat template)."""


@lru_cache(maxsize=32)
def template_variables(source: str) -> frozenset[str]:
    """The top-level variables a Jinja chat template reads (``messages``, ``tools``, ``enable_thinking``, ...).

    Parsed in transformers' own chat-template environment (its ``{% generation %}``
    tag, ``tojson`` filter, ...), so a template parses here iff transformers can
    compile it. Raises ``jinja2.TemplateError`` (with ``lineno`` for a syntax error).
    """
    from jinja2 import meta
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template  # compiled once, cached
        env = _compile_jinja_template(source).environment
    except ImportError:  # a transformers without this helper: plain Jinja (no {% generation %} tag)
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    return frozenset(meta.find_undeclared_variables(env.parse(source)))


def _jinja_problem(e) -> str:
    line = getattr(e, "lineno", None)
    return f"line {line}: {e.message}" if line else str(e.message)


def load_chat_template(path: str) -> str:
    """The Jinja source of ``--chat-template FILE``. Raises PromptError naming the file (and line)
    when it cannot be read or does not parse."""
    import jinja2
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"--chat-template {path!r}: cannot read it: {e}") from None
    if not source.strip():
        raise PromptError(f"--chat-template {path!r}: the file is empty (expected a Jinja chat template)")
    try:
        template_variables(source)
    except jinja2.TemplateError as e:
        raise PromptError(f"--chat-template {path!r}: {_jinja_problem(e)}") from None
    return source


def _check_controls(source: str, c: ChatTemplateControls) -> None:
    import jinja2
    try:
        used = template_variables(source)
    except jinja2.TemplateError as e:
        raise PromptError(f"field '{c.prefix}chat_template': {_jinja_problem(e)}") from None
    for name in ("tools", "documents"):
        if getattr(c, name) is not None and name not in used:
            raise PromptError(f"field '{c.prefix}{name}': the chat template does not use {name}")
    for key in c.chat_template_kwargs:
        if key not in used:
            raise PromptError(f"field '{c.prefix}chat_template_kwargs.{key}': the chat template has no "
                              f"variable {key!r}")


def encode_messages(tokenizer, messages: list[dict], controls: ChatTemplateControls | None = None) -> list[int]:
    c = controls or DEFAULT_CONTROLS
    if c.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise PromptError("messages: this model has no chat template; give a plain \"prompt\" instead "
                          "(or --chat-template FILE)")
    if c != DEFAULT_CONTROLS:
        _check_controls(tokenizer.get_chat_template(c.chat_template, c.tools), c)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **c.template_args())
    except Exception as e:  # jinja errors: bad roles, wrong alternation, ...
        raise PromptError(f"messages: the chat template rejected them: {e}") from None
    # The template already holds any BOS it wants.
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode(prompt, add_special_tokens=True)


def encode(tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
           chat: bool = False, system: str | None = None, controls: ChatTemplateControls | None = None) -> list[int]:
    """Messages get the chat template (with ``controls``); a plain prompt is a raw completion unless
    ``chat`` (then it becomes one user message, with ``system`` if given)."""
    if messages is not None:
        return encode_messages(tokenizer, messages, controls)
    assert prompt is not None
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return encode_messages(tokenizer, msgs)
    return encode_prompt(tokenizer, prompt)
