"""Divergences from outside todi: ``--plugin MODULE`` and the ``todi.divergences`` entry point group.

A plugin is any importable module that registers divergences when imported::

    # my_divergences.py
    from todi.divergences import register_divergence

    def _check(params):
        if params["power"] <= 0:
            raise ValueError(f"power={params['power']} must be > 0")

    @register_divergence("powered_fkl", params={"power": 1.0}, check=_check)
    def powered_fkl(student_logp, teacher_logp, power):
        ...

``todi distill --plugin my_divergences --loss powered_fkl --loss-params power=2`` then uses it. An
installed package can instead declare the module under the entry point group ``todi.divergences``
(``[project.entry-points."todi.divergences"] mine = "my_divergences"``); todi imports those the first
time a divergence name is not found.
"""

from __future__ import annotations

import importlib
import logging
from importlib import metadata

from todi.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["ENTRY_POINT_GROUP", "load_entry_points", "load_plugins"]

ENTRY_POINT_GROUP = "todi.divergences"
_loaded_entry_points = False


def load_plugins(modules: str | None) -> None:
    """Import each comma-separated module of ``--plugin``; one that cannot be imported is a UsageError."""
    for name in (m.strip() for m in (modules or "").split(",")):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except Exception as err:  # the plugin's own import errors, too: name the module either way
            reason = (f"{type(err).__name__}: {err}".strip().splitlines() or [""])[0][:300]
            raise UsageError(
                f"--plugin {name}: cannot import it ({reason})",
                "give an importable module name (on PYTHONPATH or installed), not a file path",
            ) from err


def load_entry_points() -> None:
    """Import the modules of the ``todi.divergences`` entry points, once per process."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:  # a broken third-party package must not stop todi's own divergences
            logger.warning(
                "entry point %s (%s) of %s failed to load: %s",
                entry.name,
                entry.value,
                ENTRY_POINT_GROUP,
                err,
            )
