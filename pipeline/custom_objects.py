"""Custom objects: the Python modules a model needs before its Keras files load.

A layer class registered with ``keras.saving.register_keras_serializable``
loads in Keras safe mode, but only in a process that has imported the module
defining it. ``pipeline partition --import MODULE`` imports MODULE before
loading SOURCE and records it in ``topology.yaml`` (``imports:``); every
process that loads a shard or the whole model imports the recorded modules
first, from the normal import path (``PYTHONPATH`` or installed packages). The
project's own layers (:mod:`pipeline.partition.masks`) are imported the same
way, so shard files that carry masks across cuts load everywhere.

Nothing here loosens safe mode: a ``Lambda`` layer still needs ``--unsafe``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence

from pipeline.errors import UsageError
from pipeline.log import get_logger

#: the project's own registered layers, imported before any Keras file is loaded.
PIPELINE_LAYERS = "pipeline.partition.masks"
#: where the documentation tells how a module reaches every host.
DOCS = "docs/CUSTOM_LAYERS.md"

log = get_logger("pipeline.custom_objects")


class ImportFailed(UsageError):
    """A module that a model needs cannot be imported (exit code 2, INVALID_ARGUMENT)."""


def check_module_names(names: Iterable[str], option: str = "--import") -> tuple[str, ...]:
    """The names as a tuple, each a dotted Python module name; raise :class:`UsageError` naming a bad one."""
    out: list[str] = []
    for name in names:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise UsageError(f"{option} {name!r}: expected a Python module name such as my_layers or my_pkg.layers")
        if name not in out:
            out.append(name)
    return tuple(out)


def import_modules(modules: Sequence[str], *, needed_by: str, recorded: bool = True, own_layers: bool = True) -> None:
    """Import the project's layers (unless ``own_layers`` is false), then ``modules`` in order; raise
    :class:`ImportFailed` naming the first module that cannot be imported, what needs it, and the import error."""
    if own_layers:
        importlib.import_module(PIPELINE_LAYERS)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, but also whatever the module raises while it runs
            where = "listed under imports in topology.yaml" if recorded else "given with --import"
            raise ImportFailed(
                f"{needed_by} needs the Python module {name!r} ({where}), which cannot be imported: "
                f"{type(exc).__name__}: {exc}. The module must be importable on every host that loads the model: "
                f"install it there, or put the folder that holds it on PYTHONPATH (see {DOCS})"
            ) from exc
        log.debug("module_imported", module=name, needed_by=needed_by)


def prepare_topology(topology: object, needed_by: str) -> None:
    """Import the topology's recorded ``imports`` (a worker, before it opens a socket: a host without them fails
    at once). The project's own layers, which import Keras, are left to the loaders, so a topology without
    imports costs nothing here."""
    import_modules(tuple(getattr(topology, "imports", ()) or ()), needed_by=needed_by, own_layers=False)


def foreign_classes(class_names: Iterable[str], modules: Sequence[str]) -> list[str]:
    """The ``module.Class`` names that come neither from Keras/TensorFlow/this project nor from ``modules``:
    a process that has not imported their module cannot load the model."""
    builtin = ("keras.", "keras_", "tensorflow.", "tf_keras.", "pipeline.")
    out = []
    for cls in class_names:
        module = cls.rpartition(".")[0]
        if module.startswith(builtin) or any(module == m or module.startswith(m + ".") for m in modules):
            continue
        if cls not in out:
            out.append(cls)
    return out
