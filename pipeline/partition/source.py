"""Loading a model to split: a ``.keras`` file, or a ``keras.applications`` model by name."""

from __future__ import annotations

import os
import re
import weakref
import zipfile
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError

SEED = 0
#: rows of the fixed-seed random batch that calibrates BatchNormalization statistics.
CALIBRATION_BATCH = 16
#: the value LayerScale factors (ConvNeXt) are raised to from their 1e-6 initialisation.
LAYER_SCALE = 1.0
#: how the weights of each model this process built were made (see :func:`weights_of`).
_WEIGHTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def applications() -> dict[str, str]:
    """Normalised name (lower case, no ``_``) to the ``keras.applications`` constructor's name."""
    import keras

    names = {}
    for attr in dir(keras.applications):
        obj = getattr(keras.applications, attr)
        if attr[:1].isupper() and callable(obj):
            names[_norm(attr)] = attr
    return names


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_source(source: str, *, input_shape: tuple[int, ...] | None = None, unsafe: bool = False) -> tuple[Any, str]:
    """Load SOURCE and return ``(model, default_name)``."""
    quiet_tensorflow()
    path = Path(source)
    if path.suffix == ".keras" or path.exists():
        return load_keras_file(path, unsafe=unsafe), _snake(path.stem)
    import keras

    apps = applications()
    ctor_name = apps.get(_norm(source))
    if ctor_name is None:
        import difflib

        close = difflib.get_close_matches(_norm(source), list(apps), n=5, cutoff=0.5)
        raise UsageError(
            f"SOURCE {source!r} is neither an existing .keras file nor a keras.applications model name. "
            f"Expected a path to a .keras file or a name like 'mobilenet_v3_large'"
            + (f"; closest application names: {[apps[c] for c in close]}" if close else "")
        )
    ctor = getattr(keras.applications, ctor_name)
    keras.backend.clear_session()  # fresh name counters: stable layer and input names
    keras.utils.set_random_seed(SEED)
    kwargs: dict[str, Any] = {"weights": None}
    if input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    try:
        model = ctor(**kwargs)
    except Exception as exc:
        raise UsageError(f"building keras.applications.{ctor_name}(**{kwargs}) failed: {exc}") from exc
    if input_shape is None and any(d is None for d in model.inputs[0].shape[1:]) and len(model.inputs[0].shape) == 4:
        # Applications without a default size (MobileNetV3) are built at their usual 224×224.
        keras.backend.clear_session()
        keras.utils.set_random_seed(SEED)
        model = ctor(weights=None, input_shape=(224, 224, 3))
    _WEIGHTS[model] = {
        "source": f"keras.applications.{ctor_name}",
        "init": f"random (weights=None), seed {SEED}",
        **calibrate(model),
    }
    return model, _snake(source)


def weights_of(model: Any) -> dict[str, Any]:
    """How ``model``'s weights were made, for the topology's ``weights`` record."""
    return dict(_WEIGHTS.get(model, {"source": "file", "init": "trained (loaded from the .keras file)"}))


def calibrate(model: Any, *, seed: int = SEED, rows: int = CALIBRATION_BATCH) -> dict[str, Any]:
    """Give a randomly initialised model realistic activations, deterministically.

    With ``weights=None`` every BatchNormalization keeps moving statistics 0
    and 1, the activations vanish on the way through, and a deep network
    answers the same for every input (MobileNetV3Large: exactly 0.001 for all
    classes), so no comparison against it can catch a wrong answer. One
    training-mode pass over a fixed-seed random batch with momentum 0 sets
    every moving mean and variance to that batch's statistics. LayerScale
    factors (ConvNeXt) start at 1e-6, which makes their blocks do nothing:
    they are raised to :data:`LAYER_SCALE`. Same seed, same weights.
    """
    import keras
    import numpy as np

    layers = list(model._flatten_layers(include_self=False))
    bns = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    scales = [layer for layer in layers if type(layer).__name__ == "LayerScale" and hasattr(layer, "gamma")]
    for layer in scales:
        layer.gamma.assign(np.full(tuple(layer.gamma.shape), LAYER_SCALE, dtype=layer.gamma.dtype))
    if bns:
        rng = np.random.default_rng(seed)
        batch = []
        for tensor in model.inputs:
            shape = [rows, *(d if d is not None else 1 for d in tensor.shape[1:])]
            batch.append(rng.standard_normal(shape).astype(keras.backend.standardize_dtype(tensor.dtype)))
        momenta = [layer.momentum for layer in bns]
        try:
            for layer in bns:
                layer.momentum = 0.0
            model(batch if len(batch) > 1 else batch[0], training=True)
        finally:
            for layer, momentum in zip(bns, momenta):
                layer.momentum = momentum
    record: dict[str, Any] = {}
    if bns:
        record["calibration"] = (
            f"BatchNormalization moving statistics of {len(bns)} layers from one training-mode pass over "
            f"{rows} standard-normal inputs (seed {seed}, momentum 0)"
        )
    if scales:
        record["layer_scale"] = f"{len(scales)} LayerScale factors raised from 1e-6 to {LAYER_SCALE:g}"
    return record


def load_keras_file(path: Path, *, unsafe: bool = False) -> Any:
    import keras

    if not path.is_file():
        raise UsageError(f"model file {str(path)!r} does not exist; expected a .keras file")
    if not zipfile.is_zipfile(path):
        raise UsageError(
            f"{str(path)!r} is not a Keras model file: expected a .keras archive (a zip written by model.save), "
            f"received a {path.stat().st_size}-byte file that is not a zip archive"
        )
    try:
        return keras.saving.load_model(path, safe_mode=not unsafe, compile=False)
    except Exception as exc:
        text = str(exc)
        if "safe_mode" in text or "Lambda" in text:
            raise UsageError(
                f"{str(path)!r} needs unsafe deserialization (it holds a Lambda layer or other Python code, which "
                "Keras safe mode refuses because loading it can run arbitrary code). Expected a model made of "
                "serializable layers; if you trust this file, pass --unsafe (at partition and at serve time)."
            ) from exc
        raise UsageError(f"{str(path)!r} could not be loaded as a Keras model: {type(exc).__name__}: {text}") from exc


def _snake(name: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_").lower() or "model"
