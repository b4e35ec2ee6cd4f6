"""Structured JSON logs, one object per line on stderr."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_events(logger: logging.Logger, events: list[dict[str, Any]],
                 level: int = logging.INFO) -> None:
    """Many events in one write, in JsonFormatter's shape: the decision log writes a line per
    request, and the logging machinery costs more than the line itself."""
    write_json(logger, [], events, level)


def write_json(logger: logging.Logger, texts: list[str], events: list[dict[str, Any]],
               level: int = logging.INFO) -> None:
    """``write_events`` for events some of which are already serialised (``texts``: a JSON
    object each, written first)."""
    if not (texts or events) or not logger.isEnabledFor(level):
        return
    now = time.time()
    head = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z", "level": logging.getLevelName(level).lower(),
            "logger": logger.name, "pid": os.getpid()}
    lead = orjson.dumps(head).decode()[:-1] + ","
    sys.stderr.write("".join([*(lead + t[1:] + "\n" for t in texts), *(
        orjson.dumps({**head, **e}, default=str).decode() + "\n" for e in events)]))
    sys.stderr.flush()


def log_event(logger: logging.Logger, fields: dict[str, Any], level: int = logging.INFO) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, fields.get("event", ""), extra={"fields": fields})
