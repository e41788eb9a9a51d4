"""Logging: the package logs through the standard :mod:`logging` module.

Every module logs to ``logging.getLogger(__name__)`` (children of the
``torchrec_esd`` logger) and installs no handler itself, so an application
decides what is shown, as with any library.  The command-line programs
(``examples/``, ``benchmarks/``) call :func:`configure_logging`, which puts
one handler on the ``torchrec_esd`` logger whose records carry the
torch.distributed rank and the ESD role of the process::

    [rank 3 ps] INFO torchrec_esd.distributed.runtime: parameter server 0 serving 26 tables
    [rank 0 worker] INFO torchrec_esd.apps.esd_job: ESD hybrid: 30 steps in 4.1 s

The rank is read when a record is formatted (``torch.distributed`` once
initialised, else the ``RANK`` environment variable of torchrun, else ``-``);
the role is set by :class:`~torchrec_esd.distributed.runtime.EsdRuntime`
(:func:`set_role`).  Results tables of the programs stay ``print`` output.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, TextIO, Union

PACKAGE_LOGGER = "torchrec_esd"
_role: Optional[str] = None


def set_role(role: Optional[str]) -> None:
    """The ESD role of this process (``"worker"``, ``"ps"``) for the prefix."""
    global _role
    _role = role


def _rank() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return str(dist.get_rank())
    except Exception:  # noqa: BLE001 - a prefix must never break logging
        pass
    return os.environ.get("RANK", "-")


class RankPrefixFilter(logging.Filter):
    """Adds ``record.rank_prefix`` (``"rank 3 ps"``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = f"rank {_rank()}" + (f" {_role}" if _role else "")
        return True


def configure_logging(level: Union[int, str] = "INFO", stream: Optional[TextIO] = None) -> logging.Handler:
    """Show the package's records at ``level`` and above on ``stream``
    (default stderr), each prefixed ``[rank R role]``.  Idempotent: a second
    call replaces the handler it installed.  Returns the handler."""
    if isinstance(level, str):
        if not isinstance(logging.getLevelName(level.upper()), int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = logging.getLevelName(level.upper())
    logger = logging.getLogger(PACKAGE_LOGGER)
    for h in list(logger.handlers):
        if getattr(h, "_torchrec_esd", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._torchrec_esd = True  # type: ignore[attr-defined]
    handler.addFilter(RankPrefixFilter())
    handler.setFormatter(logging.Formatter("[%(rank_prefix)s] %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
