"""Exception types shared by every layer.

`InvalidInputError` marks problems with what the user gave us (paths, ratios, method names, model
folders). Entry points turn it into a one-line message and exit code 2 instead of a traceback, so it
must be raised *before* any expensive work starts.
"""

from __future__ import annotations


class AdaSVDError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(AdaSVDError, ValueError):
    """The user's input (argument, file, model folder, config) cannot be used."""
