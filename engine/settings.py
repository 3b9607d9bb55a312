"""Settings read from the environment, checked where they are read: a bad value is one
sentence naming the variable, never a traceback."""

from __future__ import annotations

import os

from engine.errors import UserError


def env_int(name: str, default: int) -> int:
    """The positive whole number in environment variable `name`, `default` when unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"the environment variable {name} must be a positive whole number, "
                        f"got {text!r}; fix it and restart the app.")
    return value
