from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    REQUEST: _ClassVar[Kind]
    RESULT: _ClassVar[Kind]
    ERROR: _ClassVar[Kind]
    HEARTBEAT: _ClassVar[Kind]
KIND_UNSPECIFIED: Kind
REQUEST: Kind
RESULT: Kind
ERROR: Kind
HEARTBEAT: Kind

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "origin")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    origin: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., origin: _Optional[str] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("name", "start_ns", "end_ns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_NS_FIELD_NUMBER: _ClassVar[int]
    END_NS_FIELD_NUMBER: _ClassVar[int]
    name: str
    start_ns: int
    end_ns: int
    def __init__(self, name: _Optional[str] = ..., start_ns: _Optional[int] = ..., end_ns: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("process", "ready", "pid", "rss_bytes", "host", "stats", "metrics")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    process: str
    ready: bool
    pid: int
    rss_bytes: int
    host: str
    stats: _containers.ScalarMap[str, float]
    metrics: str
    def __init__(self, process: _Optional[str] = ..., ready: _Optional[bool] = ..., pid: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., host: _Optional[str] = ..., stats: _Optional[_Mapping[str, float]] = ..., metrics: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("version", "kind", "request_id", "model", "sender", "tensors", "error", "spans", "heartbeat", "sent_ns", "attempt", "followers", "budget_ns", "routes")
    class RoutesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    SENT_NS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FOLLOWERS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_NS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: Kind
    request_id: int
    model: str
    sender: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    error: Error
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    heartbeat: Heartbeat
    sent_ns: int
    attempt: int
    followers: int
    budget_ns: int
    routes: _containers.ScalarMap[str, str]
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., request_id: _Optional[int] = ..., model: _Optional[str] = ..., sender: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., sent_ns: _Optional[int] = ..., attempt: _Optional[int] = ..., followers: _Optional[int] = ..., budget_ns: _Optional[int] = ..., routes: _Optional[_Mapping[str, str]] = ...) -> None: ...
