"""Validation of user-given names that become path components in the store."""

from __future__ import annotations

import re

from ..errors import InvalidNameError

# Letters, digits and a few separators; no path separators, no leading dot, bounded length (and no "..").
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-+@]{0,127}$"
_NAME = re.compile(NAME_PATTERN)


def validate_name(value: object, what: str) -> str:
    """Return ``value`` if it is usable as one directory name, else raise InvalidNameError.

    ``what`` names the argument in the message ("model_name", "dataset_type", ...).
    """
    if not isinstance(value, str):
        raise InvalidNameError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    if not value:
        raise InvalidNameError(f"{what} must not be empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidNameError(f"{what}={value!r} contains a control character; use printable characters")
    if "/" in value or "\\" in value:
        raise InvalidNameError(f"{what}={value!r} contains a path separator; use '-' or '_' instead")
    if ".." in value:
        raise InvalidNameError(f"{what}={value!r} contains '..'; names cannot point outside the store")
    if not _NAME.match(value):
        raise InvalidNameError(
            f"{what}={value!r} is not a valid name: use 1-128 characters from letters, digits and "
            "'_ . - + @', not starting with '.', '-', '+' or '@'"
        )
    return value
