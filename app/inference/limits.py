"""The limits a request is checked against, once, with one wording per refusal: both doors (the
chat's conversations and the OpenAI API) and both engines call these.

Every refusal is an InvalidRequestError naming the request field in `param`; the API turns it into
a 400 in the caller's error shape (app/api/errors.py). Imports no torch.
"""

from __future__ import annotations

from app.inference.types import InvalidRequestError

MAX_STOP_STRINGS = 16
# OpenAI's ranges (vLLM accepts the same).
MAX_TOP_LOGPROBS = 20
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def check_max_tokens(requested: int | None, *, limit: int, param: str = "max_tokens") -> None:
    """Refuse a reply length over the server's limit (ZEUS_MAX_NEW_TOKENS) or under 1.

    requested: tokens the caller asked for (None: not given, nothing to check); limit: the most
    this server generates per reply; param: the field's name as the caller sent it ("max_tokens",
    "max_completion_tokens", "options.max_tokens")."""
    if requested is None:
        return
    if requested < 1:
        raise InvalidRequestError(f"{param} must be at least 1, got {requested}", param=param)
    if requested > limit:
        raise InvalidRequestError(
            f"{param} {requested} is over this server's limit of {limit} (ZEUS_MAX_NEW_TOKENS)",
            param=param,
        )
