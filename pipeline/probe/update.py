"""Writing a measured speed or link into a cluster file, keeping everything else as the user wrote it.

The file is edited as a document (ruamel.yaml's round trip), so comments,
key order and flow style (``{name: edge, address: ...}``) stay as they were;
only the fields set change. The file is checked as a whole
(:func:`pipeline.cluster.cluster_from_dict`) before anything is changed, so a
typo in ``--host`` or ``--pair`` fails before a measurement is made, and again
after the change, before the file is replaced (atomically: a temporary file
renamed over it), so a write never leaves a file that ``pipeline partition``
would refuse.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from pipeline.cluster import Cluster, Link, cluster_from_dict, format_bandwidth, format_latency, load_cluster
from pipeline.errors import ClusterError, UsageError


@dataclass(frozen=True)
class Change:
    """One field set: where (as a path in the file), what it was (``None``: absent) and what it is now."""

    field: str
    before: Any
    after: Any

    def describe(self) -> str:
        before = "(absent)" if self.before is None else str(self.before)
        return f"{self.field}: {before} -> {self.after}"


def _yaml() -> YAML:
    y = YAML()  # round trip: comments, order and flow style survive
    y.preserve_quotes = True
    y.width = 4096
    return y


def parse_pair(text: str) -> tuple[str, str]:
    """``--pair edge,cloud`` -> ``("edge", "cloud")``."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"--pair: expected two host names joined by a comma, e.g. --pair edge,cloud; received {text!r}")
    return parts[0], parts[1]


class ClusterFile:
    """A cluster file loaded for editing: the validated :class:`Cluster` and the document to change."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ClusterError(f"{path}: not valid YAML: {exc}") from exc
        self.cluster: Cluster = cluster_from_dict(data, source=str(path))
        self.doc: Any = _yaml().load(text)
        self.changes: list[Change] = []

    @classmethod
    def load(cls, path: str | Path) -> ClusterFile:
        """Read and check ``path`` (a :class:`ClusterError` naming the file and field when it is wrong)."""
        path = Path(path)
        if not path.is_file():
            raise ClusterError(f"--update: cluster file {str(path)!r} does not exist (expected a YAML file; format in docs/MULTIHOST.md)")
        return cls(path, path.read_text())

    # ------------------------------------------------------------ lookups
    def host_index(self, name_or_address: str, flag: str = "--host") -> int:
        """The index in ``hosts`` of a host named by name or address."""
        for i, h in enumerate(self.cluster.hosts):
            if name_or_address in (h.name, h.address):
                return i
        listed = [f"{h.name} ({h.address})" for h in self.cluster.hosts]
        raise ClusterError(f"{flag} {name_or_address!r}: no such host in {self.path}; its hosts are {listed}")

    def host_name(self, name_or_address: str, flag: str = "--host") -> str:
        return self.cluster.hosts[self.host_index(name_or_address, flag)].name

    def check_pair(self, pair: tuple[str, str]) -> tuple[str, str]:
        """Both ends known and different; returned as host names."""
        a, b = (self.host_name(p, "--pair") for p in pair)
        if a == b:
            raise ClusterError(f"--pair {pair[0]},{pair[1]}: names host {a!r} twice; a link joins two different hosts")
        return a, b

    # ------------------------------------------------------------ changes
    def set_speed(self, host: str, speed: float) -> Change:
        """Set ``hosts[i].speed`` of the host named (by name or address) ``host``."""
        if not speed > 0:
            raise UsageError(f"a host's speed must be above zero, received {speed!r}")
        i = self.host_index(host)
        entry = self.doc["hosts"][i]
        change = Change(f"hosts[{i}].speed ({self.cluster.hosts[i].name})", entry.get("speed"), float(speed))
        entry["speed"] = float(speed)
        self.changes.append(change)
        return change

    def set_link(self, pair: tuple[str, str] | None, link: Link) -> Change:
        """Set the link of ``pair`` (an entry of ``links.pairs``, made if missing) or, for ``None``, ``links.default``."""
        value = {"bandwidth": format_bandwidth(link.bandwidth_bps), "latency": format_latency(link.latency_s)}
        links = self.doc["links"]
        if pair is None:
            entry, where = links["default"], "links.default"
        else:
            a, b = self.check_pair(pair)
            pairs = links.get("pairs")
            if pairs is None:
                pairs = CommentedSeq()
                links["pairs"] = pairs
            entry, where = None, ""
            for i, p in enumerate(pairs):
                names = {self.host_name(str(x), "links.pairs") for x in p["between"]}
                if names == {a, b}:
                    entry, where = p, f"links.pairs[{i}] ({a}-{b})"
                    break
            if entry is None:
                between = CommentedSeq([a, b])
                between.fa.set_flow_style()
                entry = CommentedMap([("between", between)])
                entry.fa.set_flow_style()
                pairs.append(entry)
                where = f"links.pairs[{len(pairs) - 1}] ({a}-{b})"
        before = None if "bandwidth" not in entry else f"{entry.get('bandwidth')}, {entry.get('latency', '0ms')}"
        entry["bandwidth"] = value["bandwidth"]
        entry["latency"] = value["latency"]
        change = Change(where, before, f"{value['bandwidth']}, {value['latency']}")
        self.changes.append(change)
        return change

    # ------------------------------------------------------------ writing
    def render(self) -> str:
        out = io.StringIO()
        _yaml().dump(self.doc, out)
        return out.getvalue()

    def write(self) -> Cluster:
        """Check the changed file as a whole, then replace the file atomically; return the cluster it now holds."""
        text = self.render()
        try:
            cluster_from_dict(yaml.safe_load(text), source=str(self.path))
        except ClusterError as exc:
            raise ClusterError(f"{self.path} was left unchanged: the update would make it invalid: {exc.message}") from exc
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            mode = self.path.stat().st_mode & 0o777
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return load_cluster(self.path)
