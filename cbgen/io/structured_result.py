"""What a record says about a constrained output: ``structured`` and ``parsed``.

``structured`` is ``{"type": kind, "name"?: schema name, "complete": bool}``:
``complete`` is true only when the text is a whole match of the constraint
(the engine's ``structured_complete``: the grammar accepted, and no
``max_new_tokens`` cut, stop string or abort ended it early). With a JSON
format, ``parsed`` holds the JSON value of a complete output and is ``null``
otherwise: an incomplete JSON text is never reported as valid.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from ..engine.outputs import RequestOutput
from ..engine.structured_params import StructuredOutputsParams


def parse_output(spec: StructuredOutputsParams, out: RequestOutput) -> tuple[bool, Any]:
    """(complete, parsed value or None) for one sample's final output."""
    complete = bool(out.structured_complete)
    if not complete or not spec.is_json:
        return complete, None
    try:
        return True, json.loads(out.text)
    except ValueError:   # cannot happen for a whole match; never call such text valid
        return False, None


def structured_fields(spec: StructuredOutputsParams, outs: Sequence[RequestOutput]
                      ) -> tuple[dict[str, Any], Any, list[tuple[bool, Any]]]:
    """(``structured`` of sample 0, its ``parsed``, (complete, parsed) of every sample in order)."""
    per_sample = [parse_output(spec, o) for o in outs]
    complete, parsed = per_sample[0]
    return {**spec.describe(), "complete": complete}, parsed, per_sample
