"""tunelab's own error types.

Every error a user can cause (bad data, bad config, a model that cannot be
loaded) is raised as a ``TunelabError`` subclass whose message says what was
wrong, where, and how to fix it. The CLI prints these without a traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """Base class: an error caused by the user's input, with a message meant for them."""


class ConfigError(TunelabError):
    """A config key is unknown, has the wrong type, or an out-of-range value."""


class DataError(TunelabError):
    """A data file cannot be read or an example is malformed.

    The message names the file, the line (1-based, for line-oriented files or the
    record index otherwise) and the field when known.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.line = line
        self.field = field


class ModelError(TunelabError):
    """A model or adapter cannot be found or loaded safely."""
