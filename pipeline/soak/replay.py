"""Replay files: recorded requests and their reference outputs, in one ``.npz``.

A replay file is a zip of ``.npy`` members (``numpy.savez`` layout, stored
uncompressed), so ``numpy.load`` reads it with nothing else installed and
never needs pickle:

===================  =====================================================
member               content
===================  =====================================================
``format``           ``"keras-pipeline-replay"`` (0-d string)
``version``          :data:`FORMAT_VERSION` (0-d int64)
``model``            the model name the ingress serves (0-d string)
``count``            number of requests N (0-d int64)
``input_names``      the model's input names, in order (1-d string)
``input_dtypes``     their dtype names (``float32``...; 1-d string)
``output_names``     the model's output names, in order (1-d string)
``output_dtypes``    their dtype names (1-d string)
``reference``        who computed the outputs: ``"model.keras"`` (the whole
                     model, by ``pipeline record``) or ``"pipeline"`` (the
                     answers the ingress served, by ``--record``)
``source``           where the inputs came from (free text)
``created``          ISO 8601 UTC time of writing
``tolerance``        optional (0-d float64, ``pipeline record``): how far an
                     answer may move when dynamic batching regroups its rows
                     (see ``pipeline/oracle.py``); 0 when batching changes
                     nothing; absent in files that do not know
``tolerance_measured`` optional: the batch-1 vs batch-N difference it comes from
``in/I/J``           request I's input J (J indexes ``input_names``)
``out/I/J``          request I's reference output J (J indexes ``output_names``)
===================  =====================================================

Arrays are C-order with the batch axis first; a request may hold any batch
size. ``bfloat16`` (not a numpy dtype) is stored as its ``uint16`` bit
pattern, and the dtype list says ``bfloat16``; :func:`load` turns it back.

:class:`ReplayWriter` writes a file request by request (members are streamed
into the zip, the header members last, and the file appears under its name
only when complete). :class:`ReplayRecorder` wraps a writer in a thread
behind a bounded queue with a request count and a byte budget, so the
ingress can record live traffic without blocking its loop or filling a disk.
"""

from __future__ import annotations

import datetime as _dt
import os
import queue
import threading
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UsageError
from pipeline.log import get_logger
from pipeline.wire.codec import dtype_name

FORMAT = "keras-pipeline-replay"
FORMAT_VERSION = 1
REFERENCE_MODEL = "model.keras"
REFERENCE_PIPELINE = "pipeline"

#: requests the recorder may hold in memory before it drops (and counts) new ones.
RECORDER_QUEUE = 64
DEFAULT_RECORD_MAX_COUNT = 1000
DEFAULT_RECORD_MAX_BYTES = 256 << 20

log = get_logger("pipeline.replay")


class ReplayError(UsageError):
    """A replay file that cannot be read, or does not fit the model it is used with."""


@dataclass(frozen=True)
class Request:
    """One recorded request: its inputs and the reference outputs, by tensor name."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.inputs.values()) + sum(a.nbytes for a in self.outputs.values())


@dataclass(frozen=True)
class Replay:
    model: str
    input_names: tuple[str, ...]
    input_dtypes: tuple[str, ...]
    output_names: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    requests: tuple[Request, ...]
    reference: str
    source: str = ""
    created: str = ""
    version: int = FORMAT_VERSION
    tolerance: float | None = None  # the batching oracle's tolerance, when the recorder measured it
    tolerance_measured: float | None = None

    def __len__(self) -> int:
        return len(self.requests)


# ----------------------------------------------------------------- dtypes
def _to_storable(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    return array.view(np.uint16) if dtype_name(array.dtype) == "bfloat16" else array


def _from_stored(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16)
    return array


# ----------------------------------------------------------------- writing
class ReplayWriter:
    """Write a replay file one request at a time; :meth:`close` makes it appear at ``path``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: str,
        inputs: Sequence[tuple[str, str]],
        outputs: Sequence[tuple[str, str]],
        *,
        reference: str,
        source: str = "",
    ) -> None:
        self.path = Path(path)
        self.model = model
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.reference = reference
        self.source = source
        self.count = 0
        self.nbytes = 0
        self.closed = False
        self.tolerance: float | None = None  # set before close() to record the batching oracle
        self.tolerance_measured: float | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> int:
        """Append one request; return its index. Raise :class:`ReplayError` when a tensor is missing or of another dtype."""
        i = self.count
        for group, specs, arrays in (("in", self.inputs, inputs), ("out", self.outputs, outputs)):
            for j, (name, dtype) in enumerate(specs):
                if name not in arrays:
                    raise ReplayError(f"request {i}: expected tensor {name!r} in its {group}puts, received {sorted(arrays)}")
                array = np.asarray(arrays[name])
                if dtype_name(array.dtype) != dtype:
                    raise ReplayError(f"request {i}: tensor {name!r} should be {dtype}, received {dtype_name(array.dtype)}")
                self._member(f"{group}/{i}/{j}", _to_storable(array))
                self.nbytes += array.nbytes
        self.count += 1
        return i

    def close(self) -> Path:
        """Write the header members and move the file into place (idempotent)."""
        if self.closed:
            return self.path
        self.closed = True
        header: dict[str, np.ndarray] = {
            "format": np.array(FORMAT),
            "version": np.array(FORMAT_VERSION, dtype=np.int64),
            "model": np.array(self.model),
            "count": np.array(self.count, dtype=np.int64),
            "input_names": np.array([n for n, _ in self.inputs], dtype=str),
            "input_dtypes": np.array([d for _, d in self.inputs], dtype=str),
            "output_names": np.array([n for n, _ in self.outputs], dtype=str),
            "output_dtypes": np.array([d for _, d in self.outputs], dtype=str),
            "reference": np.array(self.reference),
            "source": np.array(self.source),
            "created": np.array(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
        }
        if self.tolerance is not None:
            header["tolerance"] = np.array(float(self.tolerance), dtype=np.float64)
            header["tolerance_measured"] = np.array(float(self.tolerance_measured or 0.0), dtype=np.float64)
        for name, value in header.items():
            self._member(name, value)
        self._zip.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop a file that will not be completed."""
        if not self.closed:
            self.closed = True
            self._zip.close()
            self._tmp.unlink(missing_ok=True)

    def _member(self, name: str, array: np.ndarray) -> None:
        with self._zip.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, array, allow_pickle=False)

    def __enter__(self) -> ReplayWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write(
    path: str | os.PathLike[str],
    model: str,
    inputs: Sequence[tuple[str, str]],
    outputs: Sequence[tuple[str, str]],
    requests: Sequence[Request],
    *,
    reference: str = REFERENCE_MODEL,
    source: str = "",
) -> Path:
    """Write a whole replay file at once."""
    with ReplayWriter(path, model, inputs, outputs, reference=reference, source=source) as writer:
        for r in requests:
            writer.add(r.inputs, r.outputs)
    return writer.path


# ----------------------------------------------------------------- reading
def load(path: str | os.PathLike[str]) -> Replay:
    """Read a whole replay file; raise :class:`ReplayError` saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"replay file {str(path)!r} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ReplayError(f"{path} is not a replay file (expected an .npz written by `pipeline record`): {exc}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ReplayError(f"{path} holds a single array; expected a replay .npz with the members listed in docs/SOAK.md")
    with z:
        files = set(z.files)

        def get(key: str) -> np.ndarray:
            if key not in files:
                raise ReplayError(f"{path}: missing member {key!r}; expected a replay file (format {FORMAT!r})")
            try:
                return z[key]
            except ValueError as exc:
                raise ReplayError(f"{path}: member {key!r} cannot be read: {exc}") from None

        fmt = str(get("format"))
        if fmt != FORMAT:
            raise ReplayError(f"{path}: format is {fmt!r}; expected {FORMAT!r}")
        version = int(get("version"))
        if version != FORMAT_VERSION:
            raise ReplayError(f"{path}: replay format version {version} is not supported; expected {FORMAT_VERSION}")
        count = int(get("count"))
        in_names = tuple(str(s) for s in get("input_names"))
        in_dtypes = tuple(str(s) for s in get("input_dtypes"))
        out_names = tuple(str(s) for s in get("output_names"))
        out_dtypes = tuple(str(s) for s in get("output_dtypes"))
        if len(in_names) != len(in_dtypes) or len(out_names) != len(out_dtypes):
            raise ReplayError(f"{path}: the name and dtype lists differ in length")
        requests = []
        for i in range(count):
            inputs = {n: _from_stored(get(f"in/{i}/{j}"), d) for j, (n, d) in enumerate(zip(in_names, in_dtypes))}
            outputs = {n: _from_stored(get(f"out/{i}/{j}"), d) for j, (n, d) in enumerate(zip(out_names, out_dtypes))}
            requests.append(Request(inputs, outputs))
        return Replay(
            model=str(get("model")),
            input_names=in_names,
            input_dtypes=in_dtypes,
            output_names=out_names,
            output_dtypes=out_dtypes,
            requests=tuple(requests),
            reference=str(get("reference")),
            source=str(z["source"]) if "source" in files else "",
            created=str(z["created"]) if "created" in files else "",
            version=version,
            tolerance=float(z["tolerance"]) if "tolerance" in files else None,
            tolerance_measured=float(z["tolerance_measured"]) if "tolerance_measured" in files else None,
        )


# ----------------------------------------------------------------- recorder
class ReplayRecorder:
    """Record requests served by the ingress into a replay file, bounded by a count and a byte budget.

    :meth:`offer` never blocks: it only counts and queues (at most
    :data:`RECORDER_QUEUE` requests wait for the writer thread; beyond that a
    request is dropped and counted). At the first request that would pass
    ``max_count`` or ``max_bytes`` the recorder stops, logs ``record_stopped``
    and completes the file; :meth:`close` (at ingress shutdown) does the same.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: str,
        inputs: Sequence[tuple[str, str]],
        outputs: Sequence[tuple[str, str]],
        *,
        max_count: int = DEFAULT_RECORD_MAX_COUNT,
        max_bytes: int = DEFAULT_RECORD_MAX_BYTES,
    ) -> None:
        if max_count < 1 or max_bytes < 1:
            raise UsageError(f"record limits must be positive, received max_count={max_count} max_bytes={max_bytes}")
        self.path = Path(path)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.accepted = 0
        self.accepted_bytes = 0
        self.dropped = 0
        self.stopped_reason = ""
        self.error = ""
        self._writer = ReplayWriter(path, model, inputs, outputs, reference=REFERENCE_PIPELINE, source="ingress live traffic")
        # unbounded as a queue, bounded by offer() (so the stop sentinel never blocks)
        self._queue: queue.Queue[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="replay-recorder", daemon=True)
        self._thread.start()
        log.info("record_started", path=str(self.path), max_count=max_count, max_bytes=max_bytes)

    @property
    def recording(self) -> bool:
        return not self.stopped_reason

    def offer(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> bool:
        """Queue one served request (arrays must not change afterwards); False when not recorded."""
        with self._lock:
            if self.stopped_reason:
                return False
            size = sum(np.asarray(a).nbytes for a in inputs.values()) + sum(np.asarray(a).nbytes for a in outputs.values())
            if self.accepted_bytes + size > self.max_bytes:
                self._stop_locked("max_bytes")
                return False
            if self._queue.qsize() >= RECORDER_QUEUE:
                self.dropped += 1
                return False
            self._queue.put_nowait((dict(inputs), dict(outputs)))
            self.accepted += 1
            self.accepted_bytes += size
            if self.accepted >= self.max_count:
                self._stop_locked("max_count")
            return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop recording and complete the file (waits for the writer at most ``timeout_s``)."""
        with self._lock:
            if not self.stopped_reason:
                self._stop_locked("closed")
        self._thread.join(timeout_s)

    def snapshot(self) -> dict[str, float]:
        """Counters for the admin RPC."""
        return {
            "record.accepted": self.accepted,
            "record.bytes": self.accepted_bytes,
            "record.dropped": self.dropped,
            "record.recording": float(self.recording),
        }

    def _stop_locked(self, reason: str) -> None:
        self.stopped_reason = reason
        log.info(
            "record_stopped",
            path=str(self.path),
            reason=reason,
            requests=self.accepted,
            bytes=self.accepted_bytes,
            dropped=self.dropped,
        )
        self._queue.put(None)  # the writer ends after the requests already queued

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                self._writer.add(*item)
            self._writer.close()
            log.info("record_written", path=str(self.path), requests=self._writer.count, bytes=self._writer.nbytes)
        except Exception as exc:  # a full disk must not take the ingress down
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("record_failed", path=str(self.path), error=self.error)
            self._writer.abort()
