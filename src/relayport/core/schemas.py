"""Request/response building blocks shared by every router."""

from __future__ import annotations

import re
from typing import Annotated, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _no_control_chars(value: str) -> str:
    # NUL cannot be stored in PostgreSQL text and other control characters only ever mean
    # trouble in names shown in UIs and logs; refusing them is the declared charset rule.
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    return value


Name = Annotated[
    str,
    Field(min_length=1, max_length=200),
    AfterValidator(_no_control_chars),
]


class Strict(BaseModel):
    """Request bodies reject unknown fields, so typos fail loudly instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


T = TypeVar("T")


class ListResponse(BaseModel, Generic[T]):
    data: list[T]
    next: str | None = Field(
        default=None, description="Pass as `after` to get the next page; null on the last page."
    )
