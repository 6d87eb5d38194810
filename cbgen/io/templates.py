"""Prompt templates over a table row: Python ``str.format`` or Jinja.

Which kind (``kind="auto"``): Jinja iff the text contains ``{{``, ``{%`` or
``{#``; otherwise Python format. A Python template that needs a literal brace
writes ``{{`` and so reads as Jinja under ``auto``: pass ``kind="python"``
(``--template-format python``) for it.

Placeholders are known before any row is read (``columns``), so a template
naming a column the table lacks is refused up front. Rendering one row raises
``TemplateRowError`` naming the placeholder (a null value, a format spec the
value does not take, a Jinja runtime error); the caller turns it into an error
record for that row only.
"""

from __future__ import annotations

import re
import string
from typing import Any, Mapping

KINDS = ("auto", "python", "jinja")
_JINJA_MARKS = ("{{", "{%", "{#")
_ROOT = re.compile(r"[^.\[]*")  # "a.b[0]" -> "a": the column a field reads


class TemplateError(ValueError):
    """The template itself is invalid (syntax, positional fields); one line."""


class TemplateRowError(ValueError):
    """One row cannot be rendered. ``field`` is the placeholder's column."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class PromptTemplate:
    """A compiled template. ``columns``: the column names it reads, in order of first use."""

    def __init__(self, text: str, kind: str = "auto") -> None:
        if kind not in KINDS:
            raise TemplateError(f"template format {kind!r}: expected one of {', '.join(KINDS)}")
        if kind == "auto":
            kind = "jinja" if any(m in text for m in _JINJA_MARKS) else "python"
        self.text, self.kind = text, kind
        self.columns = self._compile_jinja() if kind == "jinja" else self._compile_python()

    def _compile_python(self) -> tuple[str, ...]:
        try:
            self._parts = list(string.Formatter().parse(self.text))
        except ValueError as e:  # "Single '}' encountered in format string"
            raise TemplateError(f"template: {e}") from None
        cols: list[str] = []
        for _, name, spec, _ in self._parts:
            if name is None:
                continue
            col = _ROOT.match(name).group()
            if col == "" or col.isdigit():
                raise TemplateError(f"template: placeholder {{{name}}} has no column name; "
                                    "write {column} with the name of a column")
            if spec and "{" in spec:
                raise TemplateError(f"template: placeholder {{{name}:{spec}}}: nested fields in a format "
                                    "spec are not supported")
            if col not in cols:
                cols.append(col)
        return tuple(cols)

    def _compile_jinja(self) -> tuple[str, ...]:
        import jinja2
        from jinja2 import meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # Sandboxed like transformers' chat templates; StrictUndefined so a typo is an error, not "".
        env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            ast = env.parse(self.text)
            self._jinja = env.from_string(ast)   # compiling finds unknown filters and tests
        except jinja2.TemplateSyntaxError as e:   # TemplateAssertionError ("No filter named ...") too
            raise TemplateError(f"template line {e.lineno}: {e.message}") from None
        # find_undeclared_variables is a set: keep the template's own order for messages.
        names = meta.find_undeclared_variables(ast) - set(env.globals)  # range, dict, namespace, ...
        first = {n: m.start() if (m := re.search(rf"\b{re.escape(n)}\b", self.text)) else 0 for n in names}
        return tuple(sorted(names, key=lambda n: (first[n], n)))

    def missing(self, available: set[str] | list[str] | tuple[str, ...]) -> list[str]:
        """The placeholders' columns that are not in ``available``."""
        return [c for c in self.columns if c not in available]

    def render(self, row: Mapping[str, Any]) -> str:
        """The prompt for ``row`` (column name -> value). Raises ``TemplateRowError``.

        A null (``None``) value of a column the template reads is an error, not
        the text "None": a missing cell should not become a plausible prompt.
        """
        for col in self.columns:
            if row.get(col) is None:
                raise TemplateRowError(col, f"column '{col}' is null")
        if self.kind == "jinja":
            import jinja2
            try:
                return self._jinja.render(**row)
            except jinja2.UndefinedError as e:  # e.g. {{ meta.key }} on a row whose meta lacks key
                raise TemplateRowError("template", f"template: {e.message}") from None
            except Exception as e:  # noqa: BLE001 - any runtime error of the user's template
                raise TemplateRowError("template", f"template: {type(e).__name__}: {e}") from None
        fmt = string.Formatter()
        out = []
        for literal, name, spec, conv in self._parts:
            out.append(literal)
            if name is None:
                continue
            col = _ROOT.match(name).group()
            try:
                value = fmt.convert_field(fmt.get_field(name, (), row)[0], conv)
                out.append(fmt.format_field(value, spec or ""))
            except (LookupError, AttributeError, ValueError, TypeError) as e:
                shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                raise TemplateRowError(col, f"placeholder {shown}: {e}") from None
        return "".join(out)
