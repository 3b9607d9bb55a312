"""Errors a user can cause, kept apart from bugs.

A `UserError` carries one sentence that says what is wrong and what to do. The CLI prints
it as `error: ...` with exit code 2 and the app shows it as a message; neither shows a
traceback. Anything else that escapes is a bug in the engine.
"""

from __future__ import annotations

import re


class UserError(ValueError):
    """A mistake in a recipe, a file or a setting that the user can fix."""


class Cancelled(Exception):  # noqa: N818 - a request, not an error
    """Raised from a progress callback to stop a run that the user cancelled."""


def sentence(message: str) -> str:
    """A message as a sentence to show on its own: a first plain word gets its capital
    ("the labels go up to 7 ..." -> "The labels ..."); a message that opens on a name, a
    path or code ("builtin:digits", "data.source", "`X`") is left as it is. Messages are
    written lower case so that they read inside others too ("compress[0]: the labels ...")."""
    if re.match(r"[a-z]+(?=[ ,;]|$)", message):
        return message[0].upper() + message[1:]
    return message


def reword(message: str, labels: dict[str, str], names: dict[str, str]) -> str:
    """A message in the words of the page that shows it: recipe keys as the boxes that set
    them (`labels`: "data.missing" -> "Missing values"), stored file names as the names the
    files were uploaded under (`names`)."""
    for stored, given in names.items():
        message = message.replace(stored, given)
    for key, label in sorted(labels.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(key, f"\u201c{label}\u201d")
    return sentence(message)
