"""The topology directory: the contract between the partitioner, the processes
that serve it, and tools outside this repository.

``topology.yaml`` is read once into frozen dataclasses and checked as a whole
(names, producers and consumers, order, endpoints) before any process uses it,
so a hand-edited file that does not hold together fails at start with a clear
message instead of a hang at run time.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pipeline.errors import TopologyError

TOPOLOGY_FILE = "topology.yaml"
MODEL_FILE = "model.keras"
FORMAT_VERSION = 1
INGRESS = "ingress"
DEFAULT_GRPC_ADDRESS = "127.0.0.1:8001"

#: dtypes a tensor may have on the wire and in the topology (numpy names).
DTYPES: frozenset[str] = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "bfloat16",
    }
)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, numpy dtype name and shape (``-1`` for unknown axes, the batch axis first)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: for a mask tensor (``<tensor>:mask``): the tensor whose Keras mask it carries across a cut
    mask_of: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TensorSpec:
        name = _require(data, "name", str, where)
        dtype = _require(data, "dtype", str, where)
        if dtype not in DTYPES:
            raise TopologyError(f"{where}: tensor {name!r} has dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        shape = _require(data, "shape", list, where)
        if not all(isinstance(d, int) and d >= -1 for d in shape):
            raise TopologyError(f"{where}: tensor {name!r} has shape {shape!r}; expected a list of integers >= -1")
        mask_of = data.get("mask_of", "")
        if not isinstance(mask_of, str):
            raise TopologyError(f"{where}: tensor {name!r} has mask_of {mask_of!r}; expected the name of a tensor")
        return cls(name=name, dtype=dtype, shape=tuple(shape), mask_of=mask_of)

    def accepts(self, shape: Iterable[int]) -> bool:
        """True when a concrete ``shape`` fits this spec (``-1`` matches any size)."""
        shape = tuple(shape)
        return len(shape) == len(self.shape) and all(s == -1 or s == d for s, d in zip(self.shape, shape))


@dataclass(frozen=True)
class ShardOutput:
    """An output tensor of a shard and the processes that consume it (shard names or ``ingress``)."""

    name: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Batching:
    """Dynamic batching in a worker: gather ready requests up to ``max_batch`` within ``max_delay_ms``."""

    max_batch: int = 8
    max_delay_ms: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"max_batch": self.max_batch, "max_delay_ms": self.max_delay_ms}


@dataclass(frozen=True)
class ReplicaSpec:
    """Where one replica of a shard listens (its own endpoint, bind, host and metrics address)."""

    endpoint: str
    bind: str
    host: str
    metrics: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _drop_empty({"endpoint": self.endpoint, "bind": self.bind, "host": self.host, "metrics": self.metrics})


@dataclass(frozen=True)
class ShardSpec:
    name: str
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[ShardOutput, ...]
    endpoint: str
    host: str
    bind: str
    metrics: str = ""
    batching: Batching = field(default_factory=Batching)
    curve_public_key: str = ""
    #: replicas 1..N-1 (replica 0 is the shard's own endpoint, bind, host and metrics); see :mod:`pipeline.replicas`
    extra_replicas: tuple[ReplicaSpec, ...] = ()
    #: replicas found at run time by resolving the endpoint's host name (``replicas: {count: N, discover: dns}``,
    #: a headless Service on Kubernetes); N, 0 for a shard whose replicas are listed; see :mod:`pipeline.discovery`
    discovered: int = 0

    @property
    def replicas(self) -> tuple[ReplicaSpec, ...]:
        """Every replica of the shard, replica 0 first (one replica unless ``replicas:`` says more)."""
        return (ReplicaSpec(self.endpoint, self.bind, self.host, self.metrics), *self.extra_replicas)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)


@dataclass(frozen=True)
class ProcessSpec:
    """Shards served by one worker process (one thread each, joined by ``inproc://``; see :mod:`pipeline.colocation`).

    ``threads`` sizes the process's TensorFlow intra-op pool, shared by its shards (0: the default).
    ``ingress``: the process serves the ingress too, on a thread of its own; the ingress then has no
    process of its own, and its links to the shards of this process are ``inproc://``.
    """

    name: str
    shards: tuple[str, ...]
    threads: int = 0
    ingress: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "shards": list(self.shards)}
        if self.threads:
            data["threads"] = self.threads
        if self.ingress:
            data["ingress"] = True
        return data


#: ``processes: per-shard`` (or no ``processes`` key): one worker process per shard.
PER_SHARD = "per-shard"


@dataclass(frozen=True)
class IngressSpec:
    grpc: str
    results: str
    host: str
    bind: str
    metrics: str = ""
    curve_public_key: str = ""


@dataclass(frozen=True)
class Topology:
    """A whole topology: the model's interface, its shards in a topological order, and the ingress."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tensors: Mapping[str, TensorSpec]
    shards: tuple[ShardSpec, ...]
    ingress: IngressSpec
    directory: Path = Path(".")
    version: int = FORMAT_VERSION
    security: str = "none"
    heartbeat_interval_s: float = 0.5
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: Python modules every process that loads a shard or the whole model imports first (custom layers)
    imports: tuple[str, ...] = ()
    #: worker processes and their shards; empty: one process per shard (``processes: per-shard``)
    processes: tuple[ProcessSpec, ...] = ()

    # ----------------------------------------------------------------- lookups
    def shard(self, name: str) -> ShardSpec:
        for shard in self.shards:
            if shard.name == name:
                return shard
        raise TopologyError(
            f"no shard named {name!r} in topology {self.name!r}; the shards are {[s.name for s in self.shards]}"
        )

    def shard_path(self, name: str) -> Path:
        return self.directory / self.shard(name).file

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def masks(self) -> dict[str, str]:
        """Mask tensor name -> the tensor whose Keras mask it carries (they travel in the same message)."""
        return {name: spec.mask_of for name, spec in self.tensors.items() if spec.mask_of}

    def producer_of(self) -> dict[str, str]:
        """Map every tensor to the process that produces it (a shard name, or ``ingress`` for model inputs)."""
        producer = {name: INGRESS for name in self.input_names}
        for shard in self.shards:
            for out in shard.outputs:
                producer[out.name] = shard.name
        return producer

    def producers(self, shard_name: str) -> dict[str, tuple[str, ...]]:
        """For a shard, map each producing process to the tensor names it sends to this shard."""
        producer = self.producer_of()
        parts: dict[str, list[str]] = {}
        for name in self.shard(shard_name).inputs:
            parts.setdefault(producer[name], []).append(name)
        return {k: tuple(v) for k, v in parts.items()}

    def routes(self, shard_name: str) -> dict[str, tuple[str, ...]]:
        """For a shard, map each consuming process to the tensor names this shard sends it."""
        routes: dict[str, list[str]] = {}
        for out in self.shard(shard_name).outputs:
            for consumer in out.consumers:
                routes.setdefault(consumer, []).append(out.name)
        return {k: tuple(v) for k, v in routes.items()}

    def entry_routes(self) -> dict[str, tuple[str, ...]]:
        """Which model inputs the ingress sends to which shard."""
        routes: dict[str, list[str]] = {}
        for shard in self.shards:
            for name in shard.inputs:
                if name in self.input_names:
                    routes.setdefault(shard.name, []).append(name)
        return {k: tuple(v) for k, v in routes.items()}

    def output_producers(self) -> dict[str, tuple[str, ...]]:
        """Which shard sends which model outputs to the ingress."""
        parts: dict[str, list[str]] = {}
        for shard in self.shards:
            for out in shard.outputs:
                if INGRESS in out.consumers:
                    parts.setdefault(shard.name, []).append(out.name)
        return {k: tuple(v) for k, v in parts.items()}

    def endpoint_of(self, process: str) -> str:
        """The PULL endpoint a process binds (the ingress's results endpoint for ``ingress``)."""
        return self.ingress.results if process == INGRESS else self.shard(process).endpoint

    def processes_on(self, host: str | None) -> list[str]:
        """Process names placed on ``host`` (all of them for ``None``), the ingress first."""
        names = []
        if host is None or self.ingress.host == host:
            names.append(INGRESS)
        names += [s.name for s in self.shards if host is None or s.host == host]
        return names

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "name": self.name,
            "security": self.security,
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "ingress": _drop_empty(
                {
                    "grpc": self.ingress.grpc,
                    "results": self.ingress.results,
                    "host": self.ingress.host,
                    "bind": self.ingress.bind,
                    "metrics": self.ingress.metrics,
                    "curve_public_key": self.ingress.curve_public_key,
                }
            ),
            "shards": [
                _drop_empty(
                    {
                        "name": s.name,
                        "file": s.file,
                        "host": s.host,
                        "endpoint": s.endpoint,
                        "bind": s.bind,
                        "metrics": s.metrics,
                        "curve_public_key": s.curve_public_key,
                        "batching": s.batching.to_dict(),
                        "inputs": list(s.inputs),
                        "outputs": [{"name": o.name, "consumers": list(o.consumers)} for o in s.outputs],
                        "replicas": (
                            [r.to_dict() for r in s.replicas]
                            if s.extra_replicas
                            else {"count": s.discovered, "discover": "dns"} if s.discovered else None
                        ),
                    }
                )
                for s in self.shards
            ],
            "tensors": {
                name: {"dtype": t.dtype, "shape": list(t.shape), **({"mask_of": t.mask_of} if t.mask_of else {})}
                for name, t in self.tensors.items()
            },
        }
        if self.imports:
            data["imports"] = list(self.imports)
        if self.processes:
            data["processes"] = [p.to_dict() for p in self.processes]
        data.update(self.extra)
        return data

    def write(self, directory: Path | None = None) -> Path:
        """Write ``topology.yaml`` into ``directory`` (default: this topology's own)."""
        directory = Path(directory or self.directory)
        path = directory / TOPOLOGY_FILE
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(dump_yaml(self.to_dict()))
        os.replace(tmp, path)
        return path

    def replace(self, **changes: Any) -> Topology:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------- loading
_KNOWN_KEYS = {
    "version",
    "name",
    "security",
    "heartbeat_interval_s",
    "inputs",
    "outputs",
    "ingress",
    "shards",
    "tensors",
    "imports",
    "processes",
}


def load(directory: str | os.PathLike[str], *, check_files: bool = True) -> Topology:
    """Read and check ``DIR/topology.yaml``; raise :class:`TopologyError` naming what is wrong."""
    directory = Path(directory)
    path = directory / TOPOLOGY_FILE
    if not directory.is_dir():
        raise TopologyError(f"topology directory {str(directory)!r} does not exist (expected a folder holding {TOPOLOGY_FILE})")
    if not path.is_file():
        raise TopologyError(
            f"{str(directory)!r} holds no {TOPOLOGY_FILE}; expected a directory written by `pipeline partition`"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise TopologyError(f"{path}: expected a mapping at the top level, received {type(data).__name__}")
    topology = from_dict(data, directory=directory, where=str(path))
    validate(topology, check_files=check_files)
    return topology


def from_dict(data: Mapping[str, Any], *, directory: Path, where: str = TOPOLOGY_FILE) -> Topology:
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise TopologyError(f"{where}: format version {version!r} is not supported; expected {FORMAT_VERSION}")
    name = _require(data, "name", str, where)
    inputs = tuple(TensorSpec.from_dict(t, f"{where} inputs") for t in _require(data, "inputs", list, where))
    outputs = tuple(TensorSpec.from_dict(t, f"{where} outputs") for t in _require(data, "outputs", list, where))
    tensors: dict[str, TensorSpec] = {t.name: t for t in inputs + outputs}
    for tname, spec in (data.get("tensors") or {}).items():
        tensors[tname] = TensorSpec.from_dict({"name": tname, **spec}, f"{where} tensors")
    ing = _require(data, "ingress", dict, where)
    grpc_address = str(ing.get("grpc", DEFAULT_GRPC_ADDRESS))
    results = _require(ing, "results", str, f"{where} ingress")
    ingress = IngressSpec(
        grpc=grpc_address,
        results=results,
        host=str(ing.get("host") or endpoint_host(results)),
        bind=str(ing.get("bind") or bind_address(results)),
        metrics=str(ing.get("metrics", "")),
        curve_public_key=str(ing.get("curve_public_key", "")),
    )
    shards = []
    for i, s in enumerate(_require(data, "shards", list, where)):
        swhere = f"{where} shards[{i}]"
        if not isinstance(s, dict):
            raise TopologyError(f"{swhere}: expected a mapping, received {s!r}")
        endpoint = _require(s, "endpoint", str, swhere)
        outs = []
        for j, o in enumerate(_require(s, "outputs", list, swhere)):
            if not isinstance(o, dict):
                raise TopologyError(f"{swhere} outputs[{j}]: expected a mapping with name and consumers, received {o!r}")
            consumers = o.get("consumers") or []
            if not isinstance(consumers, list) or not consumers:
                raise TopologyError(
                    f"{swhere} outputs[{j}] ({o.get('name')!r}): expected a non-empty list of consumers, received {consumers!r}"
                )
            outs.append(ShardOutput(name=_require(o, "name", str, swhere), consumers=tuple(map(str, consumers))))
        batching = s.get("batching") or {}
        shards.append(
            ShardSpec(
                name=_require(s, "name", str, swhere),
                file=_require(s, "file", str, swhere),
                inputs=tuple(map(str, _require(s, "inputs", list, swhere))),
                outputs=tuple(outs),
                endpoint=endpoint,
                host=str(s.get("host") or endpoint_host(endpoint)),
                bind=str(s.get("bind") or bind_address(endpoint)),
                metrics=str(s.get("metrics", "")),
                batching=Batching(
                    max_batch=int(batching.get("max_batch", Batching.max_batch)),
                    max_delay_ms=float(batching.get("max_delay_ms", Batching.max_delay_ms)),
                ),
                curve_public_key=str(s.get("curve_public_key", "")),
                extra_replicas=_replicas_from(s.get("replicas"), endpoint, swhere, str(s.get("name"))),
                discovered=_discovered_from(s.get("replicas"), swhere, str(s.get("name"))),
            )
        )
    extra = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
    imports = data.get("imports") or []
    if not isinstance(imports, list) or not all(isinstance(m, str) and _is_module_name(m) for m in imports):
        raise TopologyError(f"{where}: 'imports' is {imports!r}; expected a list of Python module names (e.g. [my_layers])")
    return Topology(
        version=version,
        name=name,
        inputs=inputs,
        outputs=outputs,
        tensors=tensors,
        shards=tuple(shards),
        ingress=ingress,
        directory=directory,
        security=str(data.get("security", "none")),
        heartbeat_interval_s=float(data.get("heartbeat_interval_s", 0.5)),
        extra=extra,
        imports=tuple(imports),
        processes=_processes_from(data.get("processes"), where),
    )


def validate(topology: Topology, *, check_files: bool = True) -> None:
    """Check that the topology holds together; raise :class:`TopologyError` at the first problem."""
    t = topology
    where = str(t.directory / TOPOLOGY_FILE)
    if not t.shards:
        raise TopologyError(f"{where}: expected at least one shard, received none")
    names = [s.name for s in t.shards]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TopologyError(f"{where}: shard names must be unique; {dupes} appear more than once")
    if INGRESS in names:
        raise TopologyError(f"{where}: {INGRESS!r} is reserved for the ingress and cannot name a shard")
    if t.security not in ("none", "curve"):
        raise TopologyError(f"{where}: security is {t.security!r}; expected 'none' or 'curve'")
    for group, specs in (("inputs", t.inputs), ("outputs", t.outputs)):
        gnames = [s.name for s in specs]
        if len(set(gnames)) != len(gnames):
            raise TopologyError(f"{where}: model {group} must have unique names, received {gnames}")
    endpoints = [t.ingress.results] + [s.endpoint for s in t.shards]
    if len(set(endpoints)) != len(endpoints):
        raise TopologyError(f"{where}: every process needs its own endpoint, received {endpoints}")
    for endpoint in endpoints:
        check_endpoint(endpoint, where)
    from pipeline import replicas  # replicas of a shard (its own module; it imports this one)

    replicas.validate(t, where)

    position = {s.name: i for i, s in enumerate(t.shards)}
    produced: dict[str, str] = {name: INGRESS for name in t.input_names}
    for shard in t.shards:
        swhere = f"{where}: shard {shard.name!r}"
        if check_files and not (t.directory / shard.file).is_file():
            raise TopologyError(f"{swhere}: its file {shard.file!r} does not exist in {str(t.directory)!r}")
        if not shard.inputs:
            raise TopologyError(f"{swhere}: expected at least one input tensor, received none")
        for name in shard.inputs:
            if name not in produced:
                later = [s.name for s in t.shards if name in s.output_names]
                hint = (
                    f"it is produced by {later[0]!r}, which comes later: the shards must be listed in a topological order (this one has a cycle or is out of order)"
                    if later
                    else "no shard produces it and it is not a model input"
                )
                raise TopologyError(f"{swhere}: input {name!r} is not available: {hint}")
            if name not in t.tensors:
                raise TopologyError(f"{swhere}: input {name!r} has no entry under 'tensors' (dtype and shape)")
        for out in shard.outputs:
            if out.name in produced:
                raise TopologyError(
                    f"{swhere}: output {out.name!r} is also produced by {produced[out.name]!r}; each tensor needs exactly one producer"
                )
            if out.name not in t.tensors:
                raise TopologyError(f"{swhere}: output {out.name!r} has no entry under 'tensors' (dtype and shape)")
            produced[out.name] = shard.name
            for consumer in out.consumers:
                if consumer == INGRESS:
                    if out.name not in t.output_names:
                        raise TopologyError(
                            f"{swhere}: sends {out.name!r} to the ingress, but the model outputs are {list(t.output_names)}"
                        )
                    continue
                if consumer not in position:
                    raise TopologyError(f"{swhere}: output {out.name!r} names consumer {consumer!r}, which is not a shard")
                if position[consumer] <= position[shard.name]:
                    raise TopologyError(
                        f"{swhere}: output {out.name!r} goes to {consumer!r}, which is not later in the list; shards must be in a topological order"
                    )
                if out.name not in t.shard(consumer).inputs:
                    raise TopologyError(
                        f"{swhere}: output {out.name!r} goes to {consumer!r}, whose inputs {list(t.shard(consumer).inputs)} do not include it"
                    )
    for shard in t.shards:
        for name in shard.inputs:
            producer = produced[name]
            if producer != INGRESS and shard.name not in next(
                o.consumers for o in t.shard(producer).outputs if o.name == name
            ):
                raise TopologyError(
                    f"{where}: shard {shard.name!r} takes {name!r} but its producer {producer!r} does not list it as a consumer"
                )
    for out in t.output_names:
        if out not in produced or produced[out] == INGRESS:
            raise TopologyError(f"{where}: model output {out!r} is not produced by any shard")
        if INGRESS not in next(o.consumers for o in t.shard(produced[out]).outputs if o.name == out):
            raise TopologyError(f"{where}: model output {out!r} is not sent to the ingress by {produced[out]!r}")
    _validate_masks(t, where, produced)
    for shard in t.shards:
        if shard.batching.max_batch < 1 or shard.batching.max_delay_ms < 0:
            raise TopologyError(
                f"{where}: shard {shard.name!r} batching {shard.batching}; expected max_batch >= 1 and max_delay_ms >= 0"
            )
    from pipeline import colocation  # the processes section (its own module; it imports this one)

    colocation.validate(t, where)


def _replicas_from(raw: Any, endpoint: str, where: str, shard: str) -> tuple[ReplicaSpec, ...]:
    """``replicas:`` absent or 1 -> ``()``; else a list of N ``{endpoint, bind?, host?, metrics?}``, the first the shard's own."""
    if raw is None or raw == 1 or isinstance(raw, dict):  # a mapping: replicas found by DNS (_discovered_from)
        return ()
    if isinstance(raw, bool) or isinstance(raw, int):
        if raw < 1:
            raise TopologyError(f"{where}: shard {shard!r} has replicas: {raw}; expected at least 1")
        raise TopologyError(
            f"{where}: shard {shard!r} has replicas: {raw} without their addresses; expected a list of "
            f"{{endpoint, metrics}} (one per replica, the first the shard's own), e.g. written by "
            f"`pipeline replicas DIR {shard}={raw}`, which picks free ports"
        )
    if not isinstance(raw, list) or not raw:
        raise TopologyError(f"{where}: shard {shard!r} has replicas: {raw!r}; expected a list of {{endpoint, metrics}} (at least one)")
    out = []
    for k, r in enumerate(raw):
        rwhere = f"{where} replicas[{k}] (shard {shard!r})"
        if not isinstance(r, dict):
            raise TopologyError(f"{rwhere}: expected a mapping with an endpoint, received {r!r}")
        rep = _require(r, "endpoint", str, rwhere)
        out.append(
            ReplicaSpec(
                endpoint=rep,
                bind=str(r.get("bind") or bind_address(rep)),
                host=str(r.get("host") or endpoint_host(rep)),
                metrics=str(r.get("metrics", "")),
            )
        )
    if out[0].endpoint != endpoint:
        raise TopologyError(
            f"{where}: shard {shard!r} replicas[0] has endpoint {out[0].endpoint!r}; expected the shard's own {endpoint!r}"
        )
    return tuple(out[1:])


def _discovered_from(raw: Any, where: str, shard: str) -> int:
    """``replicas: {count: N, discover: dns}`` -> N (replicas found by resolving the endpoint's name); else 0."""
    if not isinstance(raw, dict):
        return 0
    unknown = sorted(set(raw) - {"count", "discover"})
    count = raw.get("count")
    if unknown or raw.get("discover") != "dns" or isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise TopologyError(
            f"{where}: shard {shard!r} has replicas: {raw!r}; expected {{count: N, discover: dns}} with N >= 1 "
            "(replicas found by resolving the endpoint's host name), or a list of {endpoint, metrics}"
        )
    return count


def _processes_from(raw: Any, where: str) -> tuple[ProcessSpec, ...]:
    """``processes:``: absent or ``per-shard`` -> ``()``; else a list of ``{name, shards, threads?, ingress?}``."""
    if raw is None or raw == PER_SHARD:
        return ()
    if not isinstance(raw, list):
        raise TopologyError(f"{where}: 'processes' should be {PER_SHARD!r} or a list of {{name, shards}}, received {raw!r}")
    out = []
    for i, p in enumerate(raw):
        pwhere = f"{where} processes[{i}]"
        if not isinstance(p, dict):
            raise TopologyError(f"{pwhere}: expected a mapping with name and shards, received {p!r}")
        shards = _require(p, "shards", list, pwhere)
        threads = p.get("threads", 0)
        if not isinstance(threads, int) or threads < 0:
            raise TopologyError(f"{pwhere} ({p.get('name')!r}): threads is {threads!r}; expected an integer >= 1 (or absent)")
        ingress = p.get("ingress", False)
        if not isinstance(ingress, bool):
            raise TopologyError(f"{pwhere} ({p.get('name')!r}): ingress is {ingress!r}; expected true or false (or absent)")
        out.append(ProcessSpec(name=_require(p, "name", str, pwhere), shards=tuple(map(str, shards)), threads=threads, ingress=ingress))
    return tuple(out)


def _validate_masks(t: Topology, where: str, produced: Mapping[str, str]) -> None:
    """A mask tensor is bool, shaped like its tensor's leading axes, and sent with it to the same shards."""
    for name, of in t.masks.items():
        mask = t.tensors[name]
        if of not in t.tensors:
            raise TopologyError(f"{where}: mask tensor {name!r} has mask_of {of!r}, which is not a tensor of this topology")
        tensor = t.tensors[of]
        if mask.dtype != "bool":
            raise TopologyError(f"{where}: mask tensor {name!r} has dtype {mask.dtype}; expected bool")
        lead = tensor.shape[: len(mask.shape)]
        if not mask.shape or len(mask.shape) > len(tensor.shape) or any(
            a != b and -1 not in (a, b) for a, b in zip(mask.shape, lead)
        ):
            raise TopologyError(
                f"{where}: mask tensor {name!r} has shape {list(mask.shape)}; expected the leading axes of {of!r} "
                f"{list(tensor.shape)}"
            )
        if name not in produced:
            continue
        producer = produced[name]
        if produced.get(of) != producer or producer == INGRESS:
            raise TopologyError(
                f"{where}: mask tensor {name!r} comes from {producer!r} but its tensor {of!r} from {produced.get(of)!r}; "
                "expected both from the same shard (they travel in one message)"
            )
        spec = t.shard(producer)
        consumers = {o.name: set(o.consumers) - {INGRESS} for o in spec.outputs}
        if not consumers[name] <= consumers.get(of, set()):
            raise TopologyError(
                f"{where}: shard {producer!r} sends mask {name!r} to {sorted(consumers[name])} but its tensor {of!r} to "
                f"{sorted(consumers.get(of, set()))}; expected a mask to go with its tensor"
            )


def _is_module_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


# ------------------------------------------------------------------ endpoints
def check_endpoint(endpoint: str, where: str = TOPOLOGY_FILE) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme == "ipc" or parts.scheme == "inproc":
        return
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        raise TopologyError(f"{where}: endpoint {endpoint!r} is not valid; expected tcp://HOST:PORT or ipc://PATH")


def endpoint_host(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme == "tcp":
        return parts.hostname or "127.0.0.1"
    return "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_address(endpoint: str) -> str:
    """Where a process binds for a connect ``endpoint``: itself on loopback, every interface otherwise."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or not parts.hostname or is_loopback(parts.hostname):
        return endpoint
    return f"tcp://0.0.0.0:{parts.port}"


# ------------------------------------------------------------------- helpers
def _require(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise TopologyError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        raise TopologyError(f"{where}: {key!r} should be a {kind.__name__}, received {type(value).__name__} {value!r}")
    return value


def _drop_empty(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v not in ("", None)}


class _Dumper(yaml.SafeDumper):
    pass


def _flow_short_lists(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(x, (int, float, str)) for x in data) and len(data) <= 8
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _flow_short_lists)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120)
