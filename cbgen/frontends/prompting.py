"""Turn an input's prompt or messages into token ids. No torch."""

from __future__ import annotations


class PromptError(ValueError):
    """The prompt cannot be encoded (e.g. messages for a model with no chat template)."""


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("messages: this model has no chat template; give a plain \"prompt\" instead")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors: bad roles, wrong alternation, ...
        raise PromptError(f"messages: the chat template rejected them: {e}") from None
    # The template already holds any BOS it wants.
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode(prompt, add_special_tokens=True)


def encode(tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
           chat: bool = False, system: str | None = None) -> list[int]:
    """Messages get the chat template; a plain prompt is a raw completion unless
    ``chat`` (then it becomes one user message, with ``system`` if given)."""
    if messages is not None:
        return encode_messages(tokenizer, messages)
    assert prompt is not None
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return encode_messages(tokenizer, msgs)
    return encode_prompt(tokenizer, prompt)
