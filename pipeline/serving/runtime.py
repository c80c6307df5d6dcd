"""Loading a shard, compiling it and warming it up.

A shard file maps a dict ``{tensor name: array}`` of exactly its inputs to a
dict of exactly its outputs. The runtime loads it in Keras safe mode, wraps
the call in one ``tf.function`` whose input signature comes from the
topology's tensor specs with a ``None`` batch axis (so no batch size ever
retraces it), and warms it up on zeros before the worker says it is ready.

TensorFlow and Keras are imported inside functions only, so importing this
module (and ``pipeline --help``) stays fast.

Threads: TensorFlow sizes its thread pools to the machine by default, so
several workers on one small machine would each start a pool per core and
fight over them. ``configure_tensorflow`` sets the pools before TensorFlow
initialises; the worker's default is 1 intra-op and 1 inter-op thread, which
keeps N workers on an N-core machine from oversubscribing it. A worker alone
on a larger machine can take more with ``--threads``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ComputeError, InvalidInput, UsageError
from pipeline.log import get_logger
from pipeline.topology import TensorSpec, Topology

#: TensorFlow thread pools per worker (see the module docstring).
DEFAULT_INTRA_OP_THREADS = 1
DEFAULT_INTER_OP_THREADS = 1
#: calls on zeros before the worker reports ready.
DEFAULT_WARMUP_CALLS = 2
#: TensorFlow's C++ log level: 2 keeps errors, drops info and warnings.
TF_LOG_LEVEL = "2"

log = get_logger("pipeline.runtime")
#: the thread counts this process's TensorFlow was configured with (its pools are per process)
_CONFIGURED: tuple[int, int] | None = None


def quiet_tensorflow() -> None:
    """Quiet TensorFlow's C++ logs and pick the TensorFlow backend; effective before the first import."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def configure_tensorflow(intra_op_threads: int, inter_op_threads: int) -> None:
    """Import TensorFlow and size its thread pools; must run before anything runs a TensorFlow op."""
    quiet_tensorflow()
    import tensorflow as tf

    global _CONFIGURED
    if _CONFIGURED == (intra_op_threads, inter_op_threads):
        return  # the shards of one process share its pools: the first configures them for all
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
        _CONFIGURED = (intra_op_threads, inter_op_threads)
    except RuntimeError as exc:  # TensorFlow already initialised in this process: keep its pools
        log.warning("tensorflow_threads_not_set", reason=str(exc))
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # absl comes with TensorFlow; tolerate its absence
        pass


def load_model(
    path: str | os.PathLike[str], *, unsafe: bool = False, imports: Sequence[str] = (), needed_by: str = ""
) -> Any:
    """Load a ``.keras`` file in safe mode; a model that needs unsafe deserialization is refused unless ``unsafe``.

    ``imports`` (the topology's recorded modules) are imported first, so registered custom layers load.
    """
    quiet_tensorflow()
    import keras

    from pipeline.custom_objects import import_modules

    import_modules(imports, needed_by=needed_by or f"the shard file {str(path)!r}")
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"shard file {str(path)!r} does not exist")
    try:
        return keras.saving.load_model(path, safe_mode=not unsafe)
    except ValueError as exc:
        if "safe_mode" in str(exc):
            raise UsageError(
                f"{str(path)!r} needs unsafe deserialization (it holds Python code, such as a Lambda layer), "
                f"which can run arbitrary code; it was refused in safe mode. If you trust this file, pass --unsafe "
                f"(or PIPELINE_UNSAFE=1). Keras said: {exc}"
            ) from exc
        raise UsageError(f"cannot load shard file {str(path)!r}: {exc}") from exc
    except Exception as exc:  # a corrupt archive raises many kinds of errors
        raise UsageError(f"cannot load shard file {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def check_inputs(name: str, specs: Mapping[str, TensorSpec], tensors: Mapping[str, np.ndarray]) -> None:
    """Check a request's tensors against the shard's specs before computing; raise :class:`InvalidInput`."""
    from pipeline.wire.codec import NUMPY_DTYPES

    missing = sorted(specs.keys() - tensors.keys())
    extra = sorted(tensors.keys() - specs.keys())
    if missing or extra:
        raise InvalidInput(
            f"shard {name!r} expected the tensors {sorted(specs)}, received {sorted(tensors)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra})" if extra else "")
        )
    for tname, spec in specs.items():
        value = tensors[tname]
        if value.dtype != NUMPY_DTYPES[spec.dtype] or not spec.accepts(value.shape):
            raise InvalidInput(
                f"shard {name!r} input {tname!r}: expected {spec.dtype}{list(spec.shape)}, "
                f"received {value.dtype.name}{list(value.shape)}"
            )


def zeros_like_spec(spec: TensorSpec, batch: int = 1, hint: Sequence[int | None] | None = None) -> np.ndarray:
    """Zeros of a spec's dtype and shape: the batch axis ``batch``, other ``-1`` axes from ``hint`` (the
    model's own input shape, when it knows them) or 1."""
    from pipeline.wire.codec import NUMPY_DTYPES

    def size(i: int, d: int) -> int:
        if d != -1:
            return d
        if i == 0:
            return batch
        if hint is not None and len(hint) == len(spec.shape) and hint[i] is not None:
            return int(hint[i])  # type: ignore[arg-type]
        return 1

    return np.zeros([size(i, d) for i, d in enumerate(spec.shape)], dtype=NUMPY_DTYPES[spec.dtype])


class ShardRuntime:
    """One shard's sub-model, compiled once: ``runtime({name: array}) -> {name: array}``."""

    def __init__(self, name: str, model: Any, input_specs: Mapping[str, TensorSpec], output_names: Sequence[str]) -> None:
        quiet_tensorflow()
        import tensorflow as tf

        self.name = name
        self.model = model
        self.input_specs: dict[str, TensorSpec] = dict(input_specs)
        self.output_names: tuple[str, ...] = tuple(output_names)
        signature = {
            tname: tf.TensorSpec(shape=[None] + [None if d == -1 else d for d in spec.shape[1:]], dtype=tf.as_dtype(spec.dtype))
            if spec.shape
            else tf.TensorSpec(shape=[], dtype=tf.as_dtype(spec.dtype))
            for tname, spec in self.input_specs.items()
        }
        outputs = self.output_names

        def call(inputs: dict[str, Any]) -> dict[str, Any]:
            result = model(inputs, training=False)
            if isinstance(result, Mapping):
                return dict(result)
            if isinstance(result, (list, tuple)) and len(result) == len(outputs):
                return dict(zip(outputs, result))  # list outputs: taken in the topology's order
            if len(outputs) == 1 and not isinstance(result, (list, tuple)):
                return {outputs[0]: result}
            raise ComputeError(
                f"shard {name!r} returned {type(result).__name__}; expected a dict of the outputs {list(outputs)}"
            )

        self._function = tf.function(call, input_signature=[signature])
        # Calling the one concrete function directly skips tf.function's per-call dispatch (signature
        # matching of the dict): about a quarter of a millisecond per call on the reference machine.
        self._concrete = self._function.get_concrete_function()
        self._to_tensor = tf.convert_to_tensor
        self._flat = _flat_entry(self._concrete, signature)

    @classmethod
    def load(cls, topology: Topology, shard: str, *, unsafe: bool = False) -> ShardRuntime:
        """Load the shard's file from a topology directory and compile it against the topology's specs."""
        spec = topology.shard(shard)
        model = load_model(topology.shard_path(shard), unsafe=unsafe, imports=topology.imports, needed_by=f"shard {shard!r}")
        return cls(shard, model, {n: topology.tensors[n] for n in spec.inputs}, spec.output_names)

    @property
    def tracing_count(self) -> int:
        """How many times the function was traced (1 after warm-up, and it should stay 1)."""
        return int(self._function.experimental_get_tracing_count())

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the shard on exactly its inputs; raise :class:`ComputeError` when the model fails."""
        try:
            to_tensor = self._to_tensor
            if self._flat is not None:
                run, order, captured = self._flat
                result = run([to_tensor(inputs[n]) for n in order] + captured)
            else:
                result = self._concrete({n: to_tensor(inputs[n]) for n in self.input_specs})
            outputs = {k: v.numpy() for k, v in result.items()}
        except ComputeError:
            raise
        except Exception as exc:  # TensorFlow raises many kinds; the worker reports them all as INTERNAL
            raise ComputeError(f"shard {self.name!r} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        if set(outputs) != set(self.output_names):
            raise ComputeError(
                f"shard {self.name!r} returned the outputs {sorted(outputs)}; expected {sorted(self.output_names)}"
            )
        return outputs

    def warm_up(self, calls: int = DEFAULT_WARMUP_CALLS, max_batch: int = 1) -> None:
        """Trace and run the function on zeros so that the first request pays no compile cost.

        The ``None`` batch axis of the signature means one trace serves every batch size; each
        power-of-two batch size up to ``max_batch`` is still run once, so that the kernels' own
        per-shape set-up (oneDNN primitives) happens here and not on a request.
        """
        hints = {getattr(t, "name", None): tuple(t.shape) for t in (getattr(self.model, "inputs", None) or [])}
        sizes = [1]
        while sizes[-1] * 2 <= max_batch:
            sizes.append(sizes[-1] * 2)
        if sizes[-1] != max_batch and max_batch > 1:
            sizes.append(max_batch)
        runs = [1] * max(calls - 1, 0) + sizes
        for batch in runs:
            zeros = {n: zeros_like_spec(s, batch=batch, hint=hints.get(n)) for n, s in self.input_specs.items()}
            try:
                self(zeros)
            except ComputeError as exc:
                raise UsageError(
                    f"shard {self.name!r} cannot run on its topology inputs "
                    f"{ {n: f'{s.dtype}{list(s.shape)}' for n, s in self.input_specs.items()} }: {exc.message}"
                ) from exc
        self._check_flat_entry(hints)

    def _check_flat_entry(self, hints: Mapping[str | None, tuple[Any, ...]]) -> None:
        """Keep the flat entry point only if it answers exactly as the concrete function does, on inputs that
        differ from each other (so two inputs taken in the wrong order would show); else fall back to it."""
        if self._flat is None:
            return
        rng = np.random.default_rng(0)
        inputs = {n: _random_like(zeros_like_spec(s, batch=2, hint=hints.get(n)), rng) for n, s in self.input_specs.items()}
        flat = self._flat
        try:
            fast = self(inputs)
            self._flat = None
            slow = self(inputs)
        except ComputeError as exc:  # the model refuses random inputs (indices out of range, ...): cannot check
            self._flat = None
            log.info("flat_entry_unchecked", shard=self.name, reason=exc.message)
            return
        if fast.keys() == slow.keys() and all(np.array_equal(fast[k], slow[k], equal_nan=fast[k].dtype.kind in "fc") for k in fast):
            self._flat = flat
        else:
            log.warning("flat_entry_differs", shard=self.name)


def _flat_entry(concrete: Any, signature: Mapping[str, Any]) -> tuple[Any, tuple[str, ...], list[Any]] | None:
    """TensorFlow's flat entry point of a concrete function: (call, input names in its order, captured inputs),
    or None where this TensorFlow has none.

    ``ConcreteFunction.__call__`` binds the dict to the function's signature and flattens it, then asks whether
    a gradient tape is watching, before it calls the same inference function this calls (a shard never records
    gradients). Measured on MobileNetV3Large's two shards (60 and 206 captured variables), CPU time of the
    calling thread per call: 0.86 and 1.20 ms against 1.10 and 1.51 ms, the same outputs bit for bit; nearly
    all of the difference is the binding (``_call_flat``, after it, took 0.86 and 1.22 ms).
    :meth:`ShardRuntime.warm_up` checks the outputs once more on the shard's own inputs.
    """
    import tensorflow as tf

    inference = getattr(concrete, "_inference_function", None)
    call = getattr(inference, "call_preflattened", None)
    captured = getattr(concrete, "captured_inputs", None)
    if call is None or captured is None:
        return None
    order = tuple(tf.nest.flatten({name: name for name in signature}))  # how TensorFlow flattens the dict
    return call, order, list(captured)


def _random_like(zeros: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An array of the shape and dtype of ``zeros`` whose values differ from element to element."""
    if zeros.dtype.kind == "b":
        return rng.random(zeros.shape) < 0.5
    if zeros.dtype.kind in "iu":
        return rng.integers(0, 2, zeros.shape).astype(zeros.dtype)
    if zeros.dtype.kind in "fc" or zeros.dtype.name == "bfloat16":
        return rng.standard_normal(zeros.shape).astype(zeros.dtype)
    return zeros


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
