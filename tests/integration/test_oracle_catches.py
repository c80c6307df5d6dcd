"""The answer checks can fail: a pipeline that swaps the answers of concurrent requests is caught.

The fault lives in a test double of the ingress's result routing (a pending
table that hands each result part to the other of two concurrent requests),
never in production code. The real ingress serves; a fake worker computes.
The soak and the end-to-end answer check (tests/answers.py) must both fail on
it, and both pass on the same set-up without the fault.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest

from pipeline import oracle
from pipeline.pb import envelope_pb2 as pb
from pipeline.serving.pending import PendingTable
from pipeline.soak import replay
from pipeline.soak import soak as soak_mod
from tests.answers import mismatches
from tests.helpers_ingress import (
    FakeWorker,
    IngressThread,
    fake_workers,
    single_topology,
    sock_dir,
    toy_compute,
    toy_inputs,
    wait_ready,
)

REQUESTS = 12


class SwappingTable(PendingTable):
    """Routes each pair of consecutive result parts to each other's request (a deliberate routing bug)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._held: tuple[int, Mapping[str, np.ndarray], list[pb.Span]] | None = None
        self.swapped = 0

    def part(self, request_id: int, tensors: Mapping[str, np.ndarray], spans: Iterable[pb.Span]) -> str | None:
        shapes = {k: v.shape for k, v in tensors.items()}
        if self._held is None:
            self._held = (request_id, tensors, list(spans))
            return None
        held_id, held_tensors, held_spans = self._held
        self._held = None
        if held_id == request_id or {k: v.shape for k, v in held_tensors.items()} != shapes:
            super().part(held_id, held_tensors, held_spans)
            return super().part(request_id, tensors, spans)
        self.swapped += 1
        super().part(held_id, tensors, list(spans))
        return super().part(request_id, held_tensors, held_spans)


def _references() -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    inputs = [toy_inputs(1, seed=i) for i in range(REQUESTS)]
    return inputs, [toy_compute(x) for x in inputs]


@pytest.mark.parametrize("faulty", [False, True], ids=["straight", "swapped"])
def test_the_answer_check_catches_swapped_answers(tmp_path: Path, faulty: bool) -> None:
    inputs, references = _references()
    with sock_dir() as sd:
        toy = single_topology(tmp_path / "toy", sd)
        with IngressThread(toy) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute, delay_s=0.02)), ing.stub() as stub:
            wait_ready(stub)
            if faulty:
                ing.in_loop(lambda: setattr(ing.ingress, "table", SwappingTable(ing.ingress.table.capacity)))
            found = mismatches(ing.target, "toy", inputs, references, tolerance=1e-6, concurrency=4, timeout_s=5)
    if faulty:
        assert any("differs by" in m for m in found), found
    else:
        assert found == []


@pytest.mark.parametrize("faulty", [False, True], ids=["straight", "swapped"])
def test_the_soak_catches_swapped_answers(tmp_path: Path, faulty: bool) -> None:
    inputs, references = _references()
    path = replay.write(
        tmp_path / "toy.npz",
        "toy",
        [("x", "float32"), ("ids", "int64")],
        [("y", "float32")],
        [replay.Request(i, o) for i, o in zip(inputs, references)],
    )
    config = soak_mod.SoakConfig(
        target="", replay=path, duration_s=3.0, concurrency=4, timeout_s=3.0, interval_s=1.0, progress=False
    )
    with sock_dir() as sd:
        toy = single_topology(tmp_path / "toy", sd)
        with IngressThread(toy) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute, delay_s=0.01)), ing.stub() as stub:
            wait_ready(stub)
            table = SwappingTable(ing.ingress.table.capacity)
            if faulty:
                ing.in_loop(lambda: setattr(ing.ingress, "table", table))
            import dataclasses

            soak = soak_mod.Soak(dataclasses.replace(config, target=ing.target), replay.load(path))
            report = asyncio.run(soak.run())
    assert report["oracle"]["spread"]["smallest"] > 0 and report["oracle"]["kind"].startswith("bitwise")
    totals = report["totals"]
    if faulty:
        assert table.swapped > 0
        assert totals["wrong"] > 0 and not report["verdict"]["ok"], totals
        assert any("wrong answers" in r for r in report["verdict"]["reasons"])
    else:
        assert totals["wrong"] == 0 and totals["correct"] > 0 and report["verdict"]["ok"], report["verdict"]


def test_a_constant_model_is_refused_before_any_request(tmp_path: Path) -> None:
    """The same replay with answers that do not depend on the input: nothing is sent, the soak says why."""
    inputs, references = _references()
    constant = [{"y": np.full_like(references[0]["y"], 0.001)} for _ in references]
    path = replay.write(
        tmp_path / "c.npz", "toy", [("x", "float32"), ("ids", "int64")], [("y", "float32")],
        [replay.Request(i, o) for i, o in zip(inputs, constant)],
    )  # fmt: skip
    config = soak_mod.SoakConfig(target="127.0.0.1:1", replay=path, duration_s=1.0, progress=False)
    with pytest.raises(oracle.NotDiscriminating, match="cannot tell a right answer from a wrong one"):
        soak_mod.Soak(config, replay.load(path))
