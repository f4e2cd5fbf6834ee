"""The one exception class for mistakes the user can fix (bad config values, missing data).

The CLI catches it, prints its message as a single line on stderr and exits with code 2, so
no Python traceback is shown for user errors. Messages say what is wrong and how to fix it.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem in the user's configuration or environment, with a one-line fix in the message.

    A `ValueError`, so callers that only know bad values (e.g. `gsgd inspect`) catch it too.
    """


class DataNotFoundError(UserError):
    """A data set is missing where the configuration says it should be."""
