"""The error hierarchy.

Every error a user can meet carries the gRPC status it maps to and the process
exit status it maps to, so the ingress answers with one lookup and the command
line exits with one lookup, never an if-chain.
"""

from __future__ import annotations

from typing import Any

import grpc


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(PipelineError):
    """Bad command-line input: a bad model file, a bad cut, a bad option."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = 2


class PartitionError(UsageError):
    """The model cannot be split as asked."""


class TopologyError(UsageError):
    """A topology directory or ``topology.yaml`` that does not hold together."""


class ClusterError(UsageError):
    """A cluster file (hosts, the ingress's host, links) that does not hold together."""


class InvalidInput(PipelineError):
    """A request whose tensors do not match the model's declared inputs."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(PipelineError):
    status = grpc.StatusCode.NOT_FOUND


class Unavailable(PipelineError):
    """A shard the request needs is not up (or died while holding it)."""

    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PipelineError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(PipelineError):
    """A named limit was reached (requests in flight, pending joins, sizes)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class ComputeError(PipelineError):
    """A shard could not compute a request (the model raised)."""

    status = grpc.StatusCode.INTERNAL


#: drop reasons that are a size limit reached (answered RESOURCE_EXHAUSTED; any other drop is INTERNAL).
LIMIT_DROP_REASONS = frozenset({"too_many_frames", "frame_too_large", "envelope_too_large"})


class DecodeError(PipelineError):
    """A ZeroMQ message that does not match its envelope; ``reason`` is a short counter label.

    ``envelope`` is the parsed envelope when the message got that far, so the
    request it names can be answered with this error's status.
    """

    status = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.envelope: Any = None
        if reason in LIMIT_DROP_REASONS:
            self.status = grpc.StatusCode.RESOURCE_EXHAUSTED
