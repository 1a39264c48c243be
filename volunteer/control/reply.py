"""The bases of the control API's messages (`volunteer.control.messages`)."""

from __future__ import annotations

import pydantic


class Reply(pydantic.BaseModel):
    """A reply from the daemon: unknown fields are ignored, nothing is changed after."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)


class Params(pydantic.BaseModel):
    """A request's params."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)
