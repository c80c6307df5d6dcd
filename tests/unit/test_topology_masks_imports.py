"""``topology.yaml``: mask tensors (``mask_of``) and recorded ``imports`` are read, written and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import topology as topo
from pipeline.custom_objects import ImportFailed, check_module_names, foreign_classes, import_modules
from pipeline.errors import TopologyError, UsageError
from pipeline.launch import free_ports

#: addresses written into topologies, never bound (drawn free all the same, so no run can collide)
RESULTS, S0, S1, SIDE = free_ports(4)


def _data() -> dict[str, Any]:
    """Two shards: s0 sends h and its mask h:mask to s1."""
    return {
        "name": "m",
        "imports": ["acme_layers", "acme.more"],
        "inputs": [{"name": "tokens", "dtype": "int32", "shape": [-1, 9]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}],
        "ingress": {"grpc": "127.0.0.1:0", "results": f"tcp://127.0.0.1:{RESULTS}"},
        "shards": [
            {
                "name": "s0",
                "file": "s0.keras",
                "endpoint": f"tcp://127.0.0.1:{S0}",
                "inputs": ["tokens"],
                "outputs": [{"name": "h", "consumers": ["s1"]}, {"name": "h:mask", "consumers": ["s1"]}],
            },
            {
                "name": "s1",
                "file": "s1.keras",
                "endpoint": f"tcp://127.0.0.1:{S1}",
                "inputs": ["h", "h:mask"],
                "outputs": [{"name": "y", "consumers": ["ingress"]}],
            },
        ],
        "tensors": {
            "tokens": {"dtype": "int32", "shape": [-1, 9]},
            "h": {"dtype": "float32", "shape": [-1, 9, 8]},
            "h:mask": {"dtype": "bool", "shape": [-1, 9], "mask_of": "h"},
            "y": {"dtype": "float32", "shape": [-1, 3]},
        },
    }


def _load(tmp_path: Path, data: dict[str, Any]) -> topo.Topology:
    (tmp_path / topo.TOPOLOGY_FILE).write_text(yaml.safe_dump(data))
    return topo.load(tmp_path, check_files=False)


def test_round_trip(tmp_path: Path) -> None:
    t = _load(tmp_path, _data())
    assert t.imports == ("acme_layers", "acme.more")
    assert t.masks == {"h:mask": "h"}
    assert t.tensors["h:mask"].mask_of == "h" and t.tensors["h"].mask_of == ""
    assert "imports" not in t.extra
    t.write(tmp_path)
    again = topo.load(tmp_path, check_files=False)
    assert again.imports == t.imports and again.masks == t.masks
    text = (tmp_path / topo.TOPOLOGY_FILE).read_text()
    assert "imports: [acme_layers, acme.more]" in text and "mask_of: h" in text
    # a topology without either writes neither key
    plain = _data()
    del plain["imports"]
    plain["tensors"]["h:mask"].pop("mask_of")
    t = _load(tmp_path, plain)
    assert t.imports == () and t.masks == {}
    assert "imports" not in t.to_dict() and "mask_of" not in str(t.to_dict()["tensors"])


@pytest.mark.parametrize(
    "change, text",
    [
        (lambda d: d["tensors"]["h:mask"].update(dtype="uint8"), "has dtype uint8; expected bool"),
        (lambda d: d["tensors"]["h:mask"].update(shape=[-1, 8]), "expected the leading axes of 'h' [-1, 9, 8]"),
        (lambda d: d["tensors"]["h:mask"].update(shape=[-1, 9, 8, 1]), "expected the leading axes"),
        (lambda d: d["tensors"]["h:mask"].update(mask_of="nothing"), "'nothing', which is not a tensor"),
        (lambda d: d["tensors"]["h:mask"].update(mask_of=3), "expected the name of a tensor"),
        (lambda d: d.update(imports=["ok", "not a module"]), "expected a list of Python module names"),
        (lambda d: d.update(imports="acme_layers"), "expected a list of Python module names"),
    ],
)
def test_bad_masks_and_imports_are_refused(tmp_path: Path, change: Any, text: str) -> None:
    data = _data()
    change(data)
    with pytest.raises(TopologyError) as excinfo:
        _load(tmp_path, data)
    assert text in excinfo.value.message, excinfo.value.message


def test_a_mask_sent_where_its_tensor_is_not_is_refused(tmp_path: Path) -> None:
    data = _data()
    data["shards"].insert(
        1,
        {
            "name": "side",
            "file": "side.keras",
            "endpoint": f"tcp://127.0.0.1:{SIDE}",
            "inputs": ["h:mask"],
            "outputs": [{"name": "z", "consumers": ["s1"]}],
        },
    )
    data["shards"][0]["outputs"][1]["consumers"] = ["side", "s1"]
    data["shards"][2]["inputs"].append("z")
    data["tensors"]["z"] = {"dtype": "float32", "shape": [-1]}
    with pytest.raises(TopologyError, match="sends mask 'h:mask' to \\['s1', 'side'\\] but its tensor 'h' to \\['s1'\\]"):
        _load(tmp_path, data)


def test_module_names_and_imports() -> None:
    assert check_module_names(["a", "b.c", "a"]) == ("a", "b.c")
    for bad in ("", "a-b", "a..b", "1x"):
        with pytest.raises(UsageError, match="expected a Python module name"):
            check_module_names([bad])
    import_modules(["json", "email.mime"], needed_by="shard 's0'")
    with pytest.raises(ImportFailed) as excinfo:
        import_modules(["json", "no_such_module_zz1"], needed_by="shard 's0'")
    message = excinfo.value.message
    assert message.startswith("shard 's0' needs the Python module 'no_such_module_zz1' (listed under imports in topology.yaml)")
    assert "ModuleNotFoundError" in message and "PYTHONPATH" in message and excinfo.value.exit_code == 2
    assert foreign_classes(
        ["keras.src.layers.core.dense.Dense", "acme.layers.ScaledTanh", "other.Thing", "__main__.Local", "other.Thing"],
        ["acme"],
    ) == ["other.Thing", "__main__.Local"]


def test_a_module_that_raises_while_it_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_layers_zz2.py").write_text("raise RuntimeError('needs a GPU driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportFailed, match="RuntimeError: needs a GPU driver"):
        import_modules(["broken_layers_zz2"], needed_by="the whole model (model.keras)")
