"""Saying a thing once per process: a fast path not taken is logged the first time, with why, never silently."""

from __future__ import annotations

import logging

_said: set[tuple[str, str]] = set()


def say_once(logger: logging.Logger, key: str, msg: str, *args, level: int = logging.WARNING) -> None:
    """Log `msg % args` on `logger` the first time (logger, key) comes up in this process."""
    if (logger.name, key) not in _said:
        _said.add((logger.name, key))
        logger.log(level, msg, *args)
