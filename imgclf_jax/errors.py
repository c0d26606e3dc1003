"""User-facing errors: bad input ends in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input (data, flags, config, work directory) that they can fix."""
