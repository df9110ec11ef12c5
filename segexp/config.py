"""Building objects from config nodes."""

from __future__ import annotations

from typing import Any

import hydra.utils
from hydra.errors import InstantiationException

from segexp.errors import SegexpError


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but an error of ours raised inside a target comes out as
    itself: Hydra wraps it, and our messages already say what is wrong and what to do."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, SegexpError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
