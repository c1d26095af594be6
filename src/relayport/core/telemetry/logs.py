"""Structured logging on the stdlib root logger: one JSON object per line, or plain text.

Code logs the usual way, `log.info("delivered", extra={"event": "delivery.ok", "ms": 12})`;
the formatter adds the time, the request/tenant/principal ids from `core.context` and the
current trace id, so no call site threads them through.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from opentelemetry import trace

from relayport.core.context import principal_id_var, request_id_var, tenant_id_var
from relayport.settings import TelemetrySettings

_CONTEXT = (
    ("request_id", request_id_var),
    ("tenant_id", tenant_id_var),
    ("principal_id", principal_id_var),
)
# Attributes every LogRecord has; anything else on a record came in through `extra`.
# `color_message` is uvicorn's copy of the message with ANSI colour codes: noise in a log store.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_INT64 = (-(2**63), 2**64 - 1)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad format/args pair must not lose the line
        return f"{record.msg!r} % {record.args!r}"


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and k[0] != "_"}


def _context(record: logging.LogRecord, extras: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, var in _CONTEXT:
        # An explicit extra wins (a worker logging for a job); else the request's context.
        value = extras.pop(key, None) or var.get()
        if value is not None:
            out[key] = value
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        out["trace_id"] = trace.format_trace_id(span.trace_id)
        out["span_id"] = trace.format_span_id(span.span_id)
    return out


def _plain(value: Any) -> Any:
    """A value orjson always accepts; used only when the fast path failed."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    text = value if isinstance(value, str) else _safe_str(value)
    return text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates


class JsonFormatter(logging.Formatter):
    """`time`, `level`, `logger`, `message`, context ids, extras and `exc`, as one JSON line.

    Never raises: values orjson cannot encode become their `str()`.
    """

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, tz=UTC)
        doc: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        extras = _extras(record)
        doc.update(_context(record, extras))
        for key, value in extras.items():
            doc.setdefault(key, value)  # an extra never overwrites the fields above
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(doc, default=_safe_str, option=orjson.OPT_NON_STR_KEYS).decode()
        except (TypeError, orjson.JSONEncodeError):
            # Out-of-range ints, surrogates, cycles: flatten every value and try once more.
            flat = {str(k): _plain(v) for k, v in doc.items()}
            return orjson.dumps(flat).decode()


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal, with the same ids and `event` as the JSON lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        fields = {"event": extras.pop("event", None), **_context(record, extras)}
        tail = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        if not tail:
            return line
        head, sep, rest = line.partition("\n")  # keep a traceback below the ids
        return f"{head} [{tail}]{sep}{rest}"


class LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler this module installs; its class marks it for replacement."""


def _formatter(settings: TelemetrySettings) -> logging.Formatter:
    return JsonFormatter() if settings.log_json else TextFormatter()


def configure_logging(settings: TelemetrySettings, *, stream: IO[str] | None = None) -> LogHandler:
    """Route the root logger through one handler with the configured format and level.

    Idempotent: a handler installed by an earlier call is replaced; handlers others added
    (pytest's capture, a Sentry bridge) stay. Writes to stderr so that stdout stays free for
    commands that print results (`relayport admin ...`).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, LogHandler):
            root.removeHandler(handler)
    handler = LogHandler(stream or sys.stderr)
    handler.setFormatter(_formatter(settings))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # Uvicorn may have configured its loggers with their own handlers before we ran.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler


def uvicorn_log_config(settings: TelemetrySettings | None = None) -> dict[str, Any]:
    """`log_config=` for uvicorn: its loggers propagate to a root handler configured like ours.

    The root handler is declared here too, not only by `configure_logging`: with `workers > 1`
    uvicorn starts fresh processes that apply this dict and nothing else.

    `uvicorn.access` stays at WARNING below DEBUG: its lines carry raw paths with query strings
    (tokens included) and repeat what the edge middleware logs at DEBUG with the route template.
    """
    settings = settings or TelemetrySettings()
    formatter: dict[str, Any] = {
        "()": f"{__name__}.{'JsonFormatter' if settings.log_json else 'TextFormatter'}"
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"relayport": formatter},
        "handlers": {
            "relayport": {
                "class": f"{__name__}.LogHandler",
                "formatter": "relayport",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["relayport"], "level": settings.log_level},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True, "level": settings.log_level},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {
                "handlers": [],
                "propagate": True,
                "level": "DEBUG" if settings.log_level == "DEBUG" else "WARNING",
            },
        },
    }
