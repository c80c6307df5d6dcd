from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProcessesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Process(_message.Message):
    __slots__ = ("name", "role", "host", "pid", "ready", "up", "state", "rss_bytes", "heartbeat_age_s", "stats", "metrics", "heartbeats", "restarts")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    host: str
    pid: int
    ready: bool
    up: bool
    state: str
    rss_bytes: int
    heartbeat_age_s: float
    stats: _containers.ScalarMap[str, float]
    metrics: str
    heartbeats: int
    restarts: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., ready: _Optional[bool] = ..., up: _Optional[bool] = ..., state: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., heartbeat_age_s: _Optional[float] = ..., stats: _Optional[_Mapping[str, float]] = ..., metrics: _Optional[str] = ..., heartbeats: _Optional[int] = ..., restarts: _Optional[int] = ...) -> None: ...

class ProcessesResponse(_message.Message):
    __slots__ = ("model", "time_ns", "heartbeat_interval_s", "processes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    model: str
    time_ns: int
    heartbeat_interval_s: float
    processes: _containers.RepeatedCompositeFieldContainer[Process]
    def __init__(self, model: _Optional[str] = ..., time_ns: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., processes: _Optional[_Iterable[_Union[Process, _Mapping]]] = ...) -> None: ...
