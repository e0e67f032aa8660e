"""One logging setup: structlog JSON lines carrying the current ``trace_id`` and ``span_id``.

Standard-library loggers (grpc, uvicorn, aio-pika, psycopg) are routed through the same processors, so
every line a process writes has the same shape.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from typing import Any

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def add_trace_context(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Add the active span's W3C ids (hex) so log lines join their trace."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


@dataclass(frozen=True)
class LoggingSetup:
    """The arguments a process configured its logging with, so that its child processes can do the same."""

    service: str
    level: str
    fmt: str

    def apply(self) -> None:
        """Configure this process's logging the same way."""
        configure_logging(self.service, level=self.level, fmt=self.fmt)


_current: LoggingSetup | None = None


def current_logging() -> LoggingSetup | None:
    """How this process configured its logging; None when it has not (a library or test run)."""
    return _current


class ClientLeftWhileSending(logging.Filter):
    """gRPC's asyncio server logs an ERROR with a stack ("ExecuteBatchError raised in core by servicer method
    [...]") when a streamed response cannot be written because the call has ended under it: a client that
    stopped reading and cancelled (a browser leaving a download, a gateway whose client left). The call is
    already accounted for (the interceptor's access line says CANCELLED); this turns the record into one
    info line that says what happened."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.ERROR and message.startswith(self.PREFIX):
            method = message.removeprefix(self.PREFIX).strip(" []")
            record.msg = "the call ended while the server was sending its stream (the client left): %s"
            record.args = (method,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


# The exceptions that say the broker's connection, or a channel on it, has gone: aio_pika's channel that finds no
# transport, aiormq's wrapped socket errors, the broker's own close, and the socket errors themselves.
_CONNECTION_LOST = (
    "ChannelInvalidStateError|AMQPConnectionError|ConnectionClosed|ConnectionError|ConnectionResetError"
    "|ConnectionRefusedError|ConnectionAbortedError|BrokenPipeError"
)


class BrokerConnectionLoss(logging.Filter):
    """aiormq and aio_pika log a lost or refused RabbitMQ connection at ERROR (aiormq's "error when creating
    transport: ...", once a reconnect attempt; aio_pika's "Callback <...> error: ChannelInvalidStateError: No
    active transport in channel", once a channel callback), though aio_pika reconnects by itself and the mesh
    logs its own warning: 22 error lines in a 10 s outage, an alert on the error rate for a fault that heals
    by itself. This makes exactly those records warnings; any other error from the two libraries stays an
    error, a TLS certificate refused (which will not heal) among them."""

    PATTERNS: dict[str, tuple[re.Pattern[str], ...]] = {
        "aiormq.connection": (
            re.compile(r"error when creating transport: (?!.*certificate)", re.IGNORECASE | re.DOTALL),
            # 320 CONNECTION_FORCED: the broker is shutting down (a restart) or an operator closed it.
            re.compile(r"Unexpected connection close from remote .*reply_code=320\b", re.DOTALL),
        ),
        "aio_pika.tools": (re.compile(rf"Callback .*? error: (?:{_CONNECTION_LOST}): ", re.DOTALL),),
    }

    def filter(self, record: logging.LogRecord) -> bool:
        patterns = self.PATTERNS.get(record.name, ())
        if record.levelno >= logging.ERROR and patterns:
            message = record.getMessage()
            if any(pattern.match(message) for pattern in patterns):
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(service: str, *, level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the standard library for this process; call once at start."""
    global _current
    _current = LoggingSetup(service, level, fmt)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
        _add_service(service),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if fmt == "console":
        # A plain traceback: rich's, the default, prints every frame's locals, and rendering a crash among
        # large arrays (a 40-megapixel image) held the event loop for minutes.
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    else:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    structlog.configure(
        # Lines below the level are dropped first, before any processor has done work on them.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Chatty libraries stay at warning unless we debug.
    for name in ("aiormq", "aio_pika", "pika", "psycopg.pool", "uvicorn.access", "httpx"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # A server span's context is detached in another task when a client cancels a stream (its generator is
    # closed there), which OpenTelemetry reports as an error although nothing is lost; the span still ends.
    logging.getLogger("opentelemetry.context").setLevel(logging.CRITICAL)
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, ClientLeftWhileSending) for f in cygrpc.filters):
        cygrpc.addFilter(ClientLeftWhileSending())
    # On the very loggers that write those records: a filter on a parent logger never sees its children's.
    for name in BrokerConnectionLoss.PATTERNS:
        broker = logging.getLogger(name)
        if not any(isinstance(f, BrokerConnectionLoss) for f in broker.filters):
            broker.addFilter(BrokerConnectionLoss())


def _add_service(service: str) -> Processor:
    def processor(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
        event.setdefault("service", service)
        return event

    return processor


def describe(exc: BaseException) -> str:
    """An exception as a log line's ``error`` field: its type name, then its message where it has one.

    ``str()`` alone is empty for several exceptions a service logs most (asyncio's ``TimeoutError``,
    psycopg_pool's ``PoolTimeout``), and the type name is what says which failure it was.
    """
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


def get_logger(name: str, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A bound logger for a module."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name, **initial)
    return logger
