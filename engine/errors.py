"""Errors a user can cause, kept apart from bugs.

A `UserError` carries one sentence that says what is wrong and what to do. The CLI prints
it as `error: ...` with exit code 2 and the app shows it as a message; neither shows a
traceback. Anything else that escapes is a bug in the engine.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in a recipe, a file or a setting that the user can fix."""


class Cancelled(Exception):  # noqa: N818 - a request, not an error
    """Raised from a progress callback to stop a run that the user cancelled."""
