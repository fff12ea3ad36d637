"""Errors a user can act on: a one-line message plus a hint, shown by the CLI without a traceback."""

from __future__ import annotations


class TodiError(Exception):
    """A failure the user can fix; ``hint`` says how. The CLI prints both and exits with status 1."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(TodiError):
    """Bad options or arguments (exit status 2)."""


class DataError(TodiError):
    """Bad training/evaluation data, template or tokenizer: the message says where, the hint what to do."""


class NonFiniteError(TodiError, ValueError):
    """A NaN or infinity where a number must be finite (a teacher's logits, a loss, a gradient norm)."""


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal after saving its state; the CLI exits with 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
