"""The base of every model read from outside, and the constrained types ids and texts share."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

# Ids end up in AMQP names and Redis keys: keep them to a safe alphabet.
SafeId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@\-]+$")]
Text = Annotated[str, Field(min_length=1, max_length=256)]
TenantId = Annotated[
    str,
    Field(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
]
Seconds = StrictFloat | StrictInt
MAX_INPUT_DEPTH = 32


class Strict(BaseModel):
    """Base of every model read from outside: unknown fields and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def depth_of(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping early past ``limit``.

    Also refuses NaN and Infinity, which are not JSON and which the parser lets through.
    """
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("inputs hold NaN or Infinity, which JSON cannot carry")
    return deepest
