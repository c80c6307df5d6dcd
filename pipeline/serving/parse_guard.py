"""Requests whose bytes do not parse get ``INVALID_ARGUMENT``, not grpc's bare ``UNKNOWN``.

A generated ``add_*Servicer_to_server`` registers handlers whose request
deserializer raises on bytes that are not the expected message; grpc then
ends the call with ``UNKNOWN`` and logs a traceback, before our code runs.
``add_guarded`` registers the same handlers with a deserializer that never
raises: bytes that do not parse become an :class:`Unparsable` value, which
the wrapped method answers with ``INVALID_ARGUMENT``, naming the message it
expected and what it received.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Unparsable:
    method: str
    expected: str
    size: int
    reason: str


class _Capture:
    """Stands in for the server to receive the generated handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service = service
        self.handlers = dict(handlers)


def add_guarded(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    parsers: Mapping[str, Callable[[bytes], Any]] | None = None,
) -> str:
    """Register ``servicer`` like ``add_to_server`` does, with tolerant deserializers; return the service name.

    ``parsers`` replaces the generated deserializer of some methods (by method name); it is made tolerant
    the same way, and a failure still names the message the method expects.
    """
    capture = _Capture()
    add_to_server(servicer, capture)
    guarded = {}
    for method, handler in capture.handlers.items():
        if handler.unary_unary is None:  # streaming methods keep their handler as is
            guarded[method] = handler
            continue
        full = f"/{capture.service}/{method}"
        guarded[method] = grpc.unary_unary_rpc_method_handler(
            _answer_unparsable(handler.unary_unary),
            request_deserializer=_tolerant(handler.request_deserializer, full, (parsers or {}).get(method)),
            response_serializer=handler.response_serializer,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, guarded),))
    server.add_registered_method_handlers(capture.service, guarded)
    return capture.service


def _tolerant(deserialize: Callable[[bytes], Any], method: str, parser: Callable[[bytes], Any] | None = None) -> Callable[[bytes], Any]:
    expected = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = expected.full_name if expected is not None else "request"
    run = parser or deserialize

    def parse(data: bytes) -> Any:
        try:
            return run(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a deserializer raises
            return Unparsable(method=method, expected=name, size=len(data), reason=f"{type(exc).__name__}: {exc}")

    return parse


def _answer_unparsable(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unparsable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.method}: expected a serialized {request.expected}, received {request.size} bytes "
                f"that do not parse ({request.reason})",
            )
        return await behaviour(request, context)

    return handle
