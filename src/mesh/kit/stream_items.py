"""How a stream that stays open after an item fails (StreamProcess, StreamInference) answers that item.

An expected error (a :class:`~mesh.kit.errors.MeshError`) travels as its own ``google.rpc.Status`` in the
item's response. Anything else is a bug: logged with its stack, answered INTERNAL without its text (which may
hold internals), and the stream goes on, as the protos promise; ended by the error, one bad frame cost the
caller every frame after it.
"""

from __future__ import annotations

import structlog
from google.rpc import status_pb2

from mesh.kit.errors import Internal, MeshError


def item_error(
    error: Exception, log: structlog.stdlib.BoundLogger, event: str, **context: object
) -> status_pb2.Status:
    """The status answering the item that raised ``error``; a bug is logged as ``event`` with ``context``."""
    if isinstance(error, MeshError):
        return error.to_status()
    log.exception(event, **context)
    return Internal("the item failed; the server logged the cause").to_status()
