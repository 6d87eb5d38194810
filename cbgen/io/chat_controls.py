"""Chat-template controls of one input line -> ``ChatTemplateControls``. No tokenizer, no torch.

The fields are transformers' ``apply_chat_template`` arguments, as vLLM accepts
them in a chat request (also inside an OpenAI Batch ``body``, as extra fields):

* ``add_generation_prompt`` (bool, default true; false when
  ``continue_final_message`` is true): open a new assistant turn after the messages.
* ``continue_final_message`` (bool): leave the last message, which must be the
  assistant's and non-empty, open so the model continues it (a prefill).
  Both true is an error, as in transformers and vLLM.
* ``chat_template_kwargs`` (object): extra variables for the template, e.g.
  ``{"enable_thinking": false}``. Whether the template uses them is checked
  against the template at encode time (``frontends/prompting.py``).
* ``chat_template`` (string): a Jinja template for this line only.
* ``tools`` / ``documents`` (lists of objects): passed to the template, which must use them.
* ``tool_choice``: ``"auto"`` (default) or ``"none"`` (the tools are left out
  of the prompt); cbgen does not parse or force tool calls, so anything else is an error.

Only what can be checked from the line itself is checked here; anything that
depends on the template is checked where the template is applied.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

CONTROL_KEYS = frozenset({"add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                          "chat_template", "tools", "tool_choice", "documents"})
# apply_chat_template's own arguments (and the messages): a template kwarg of these names would
# clash with them, so each must be given as its own field (or is not the user's to set).
RESERVED_KWARGS = CONTROL_KEYS | {"messages", "conversation", "tokenize", "return_dict", "return_tensors",
                                  "padding", "truncation", "max_length", "tokenizer_kwargs",
                                  "return_assistant_tokens_mask", "sanitize_control_tokens"}
TOOL_CHOICES = ("auto", "none")
# Near misses of these are typos, not data: short names ("tools", "documents") are left out, as
# datasets carry columns such as "tool" or "document" that a line must be free to have.
TYPO_CHECKED = frozenset(k for k in CONTROL_KEYS if len(k) > 10)


class ControlError(ValueError):
    """A bad control: ``field`` is the key as written on the line (``body.tools``), ``what`` the problem."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(f"field '{field}': {what}")
        self.field, self.what = field, what


@dataclass(frozen=True)
class ChatTemplateControls:
    """How to apply the chat template to one line's messages (defaults: transformers' chat use)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None           # Jinja source for this line; None: the run's template
    tools: list[dict[str, Any]] | None = None  # None: no tools (also for tool_choice "none")
    documents: list[dict[str, Any]] | None = None
    prefix: str = ""                           # "body." on OpenAI lines, so errors name the key as written

    def template_args(self) -> dict[str, Any]:
        """Keyword arguments for ``tokenizer.apply_chat_template`` (besides the messages)."""
        args: dict[str, Any] = dict(self.chat_template_kwargs)
        args.update(add_generation_prompt=self.add_generation_prompt,
                    continue_final_message=self.continue_final_message)
        for name in ("chat_template", "tools", "documents"):
            if getattr(self, name) is not None:
                args[name] = getattr(self, name)
        return args


DEFAULT_CONTROLS = ChatTemplateControls()


def _show(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def _bool(values: dict, key: str, prefix: str) -> bool | None:
    v = values.get(key)
    if v is not None and not isinstance(v, bool):
        raise ControlError(prefix + key, f"expected true or false, got {_show(v)}")
    return v


def _objects(values: dict, key: str, prefix: str) -> list[dict] | None:
    v = values.get(key)
    if v is None:
        return None
    if not isinstance(v, list):
        raise ControlError(prefix + key, f"expected a list of objects, got {_show(v)}")
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            raise ControlError(f"{prefix}{key}[{i}]", f"expected an object, got {_show(item)}")
    return v


def parse_controls(values: dict[str, Any], prefix: str,
                   messages: list[dict[str, str]] | None) -> ChatTemplateControls | None:
    """The controls among ``values`` (a cbgen line or an OpenAI body); None when it has none.

    ``messages`` are the line's parsed messages (None for a raw ``prompt``, which
    has no template to control). ``null`` means "not given". Raises
    ``ControlError`` naming the field for a misspelt control, a wrong type, both
    ``add_generation_prompt`` and ``continue_final_message`` true, a
    continuation without a final assistant message, a reserved template kwarg,
    or an unsupported ``tool_choice``.
    """
    for key in sorted(values.keys() - CONTROL_KEYS):  # other keys are ignored, but not a misspelt control
        close = difflib.get_close_matches(key, TYPO_CHECKED, n=1, cutoff=0.85)
        if close:
            raise ControlError(prefix + key, f"unknown field (did you mean '{prefix}{close[0]}'?)")
    given = sorted(k for k in CONTROL_KEYS & values.keys() if values[k] is not None)
    if not given:
        return None
    if messages is None:
        raise ControlError(prefix + given[0], "applies only to chat 'messages' (a raw 'prompt' has no chat template)")
    add_gen = _bool(values, "add_generation_prompt", prefix)
    cont = bool(_bool(values, "continue_final_message", prefix))
    if cont and add_gen:
        raise ControlError(prefix + "continue_final_message",
                           f"cannot be true together with '{prefix}add_generation_prompt' (continue the last "
                           "assistant message, or open a new one: not both)")
    if cont:
        last = messages[-1]
        if last["role"] != "assistant":
            raise ControlError(prefix + "continue_final_message",
                               f"needs the last message to be the assistant's, got role {_show(last['role'])}")
        if not last["content"].strip():
            raise ControlError(prefix + "continue_final_message",
                               "needs a non-empty final assistant message to continue")
    kwargs = values.get("chat_template_kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise ControlError(prefix + "chat_template_kwargs", f"expected an object of template variables, got "
                                                            f"{_show(kwargs)}")
    for k in kwargs:
        if k in RESERVED_KWARGS:
            hint = f"give '{prefix}{k}' as its own field" if k in CONTROL_KEYS else "not a template variable"
            raise ControlError(f"{prefix}chat_template_kwargs.{k}", f"reserved ({hint})")
    template = values.get("chat_template")
    if template is not None and not (isinstance(template, str) and template.strip()):
        raise ControlError(prefix + "chat_template", f"expected a Jinja template string, got {_show(template)}")
    tools = _objects(values, "tools", prefix)
    choice = values.get("tool_choice")
    if choice is not None and choice not in TOOL_CHOICES:
        raise ControlError(prefix + "tool_choice", f"expected \"auto\" or \"none\" (cbgen does not force tool "
                                                   f"calls), got {_show(choice)}")
    return ChatTemplateControls(
        add_generation_prompt=(not cont) if add_gen is None else add_gen, continue_final_message=cont,
        chat_template_kwargs=dict(kwargs), chat_template=template,
        tools=None if choice == "none" else tools, documents=_objects(values, "documents", prefix), prefix=prefix)
