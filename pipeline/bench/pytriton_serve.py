"""Serve a topology's whole model (``model.keras``) from a real Triton Inference Server via PyTriton.

Run by ``pipeline bench --only colocation`` with the interpreter of
``.venv-pytriton`` (``scripts/pytriton_env.sh``), as a script: it imports
nothing of this project, whose dependencies that venv does not hold.

    python pytriton_serve.py MODEL.keras NAME GRPC_PORT HTTP_PORT METRICS_PORT THREADS \
        INPUT:DTYPE:D1,D2,.. OUTPUT:DTYPE:D1,.. [QUEUE_DELAY_US]

The model runs compiled (one ``tf.function``, as in the pipeline's workers; called the public way,
``concrete_function(x)``, where the workers take its flat entry point, see
``pipeline.serving.runtime._flat_entry``: 1.65 against 1.31 ms of CPU per call for MobileNetV3Large here),
with Triton's dynamic batching (max batch 8, and a queue delay of
``QUEUE_DELAY_US``, 1000 by default: the pipeline's own defaults), and
answers KServe v2 gRPC on ``GRPC_PORT``. Ready when it prints
``pytriton_ready``.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    path, name, grpc_port, http_port, metrics_port, threads, in_spec, out_spec, *rest = argv
    delay_us = int(rest[0]) if rest else 1000
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    def parse(spec: str) -> tuple[str, np.dtype, tuple[int, ...]]:
        tname, dtype, dims = spec.rsplit(":", 2)
        return tname, np.dtype(dtype), tuple(int(d) for d in dims.split(","))

    in_name, in_dtype, in_shape = parse(in_spec)
    out_name, out_dtype, out_shape = parse(out_spec)
    model = keras.saving.load_model(path)
    fn = tf.function(
        lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, *in_shape], tf.as_dtype(in_dtype))]
    ).get_concrete_function()
    for b in (1, 2, 4, 8):
        fn(tf.zeros([b, *in_shape], in_dtype))

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        result = fn(tf.convert_to_tensor(inputs[in_name]))
        if isinstance(result, dict):
            result = next(iter(result.values()))
        return {out_name: result.numpy()}

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=int(grpc_port),
        http_address="127.0.0.1",
        http_port=int(http_port),
        metrics_address="127.0.0.1",
        metrics_port=int(metrics_port),
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name=in_name, dtype=in_dtype, shape=in_shape)],
            outputs=[Tensor(name=out_name, dtype=out_dtype, shape=out_shape)],
            config=ModelConfig(max_batch_size=8, batcher=DynamicBatcher(max_queue_delay_microseconds=delay_us)),
            strict=False,
        )
        print("pytriton_ready", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
