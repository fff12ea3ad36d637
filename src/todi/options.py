"""One way to declare a command's options: a dataclass field whose ``help`` the CLI shows.

Every command's ``Config`` (see :mod:`todi.cli`) declares its options with :func:`option`, so the text a
user reads in ``--help`` sits next to the default it describes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["option"]


def option(
    default: Any = dataclasses.MISSING,
    text: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    **extra: Any,
) -> Any:
    """A dataclass field with ``metadata["help"] = text``; ``factory`` for mutable defaults (lists);
    ``extra`` goes to the argument parser (e.g. ``aliases``, ``action``)."""
    metadata = {"help": text, **extra}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
