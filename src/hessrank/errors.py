"""Errors hessrank raises for bad input.

Every error a user can cause by what they pass (a file, a field, a module pattern, a budget) is a
:class:`HessrankError` whose message names the offending file, field, module or value. The CLI prints the
message on one line and exits with status 2; it never shows a traceback from deep inside torch.
"""

from __future__ import annotations


class HessrankError(Exception):
    """A problem with the user's input or environment, with a message that says what to fix."""


class DataError(HessrankError, ValueError):
    """A data file cannot be read as asked (missing file, missing field, empty file, bad label)."""


class ModelError(HessrankError, ValueError):
    """A model cannot be found or loaded as asked (unknown name, offline and not cached, bad option)."""


class ScopeError(HessrankError, ValueError):
    """A module pattern matches nothing, or a parameter scope is invalid."""


class NumericalError(HessrankError, ArithmeticError):
    """A NaN or Inf appeared; the message names the batch and module where it was found."""
