"""Sequence models with Keras masks (``Embedding(mask_zero=True)``) for the masks-across-cuts tests.

Inputs are token ids with trailing zeros (padding); the padded steps are where
a lost mask shows. Each builder has a ``masked=False`` twin with the same
weights and no mask, so a test can check that the mask changes the answers.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

VOCAB = 40
STEPS = 9


def _seed() -> None:
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)


def lstm_stack(masked: bool = True) -> keras.Model:
    """Embedding(mask_zero) -> Dense -> LSTM -> LSTM -> Dense: the issue's model."""
    _seed()
    x = keras.Input((STEPS,), dtype="int32", name="tokens")
    h = layers.Embedding(VOCAB, 8, mask_zero=masked, name="embed")(x)
    h = layers.Dense(8, activation="tanh", name="project")(h)
    h = layers.LSTM(6, return_sequences=True, name="lstm_a")(h)
    h = layers.LSTM(5, name="lstm_b")(h)
    out = layers.Dense(3, name="head")(h)
    return keras.Model(x, out, name="lstm_stack")


def masked_join(masked: bool = True) -> keras.Model:
    """Two branches from the masked embedding, joined by Multiply (which reads the masks of its inputs: padded
    steps become 0) and Concatenate (which joins the masks), then an LSTM that takes the joined mask. The sum of
    the product over the steps (a keras op that ignores masks) shows a lost mask on the Multiply's inputs."""
    _seed()
    x = keras.Input((STEPS,), dtype="int32", name="tokens")
    e = layers.Embedding(VOCAB, 6, mask_zero=masked, name="embed")(x)
    a = layers.Dense(6, activation="tanh", name="branch_a")(e)
    b = layers.Dense(6, activation="sigmoid", name="branch_b")(e)
    m = layers.Multiply(name="mul")([a, b])
    c = layers.Concatenate(name="cat")([m, b])
    h = layers.LSTM(4, return_sequences=True, name="lstm")(c)
    pooled = layers.GlobalAveragePooling1D(name="pool")(h)
    total = keras.ops.sum(m, axis=1)
    out = layers.Dense(2, name="head")(layers.Concatenate(name="features")([pooled, total]))
    return keras.Model(x, out, name="masked_join")


def padded_tokens(batch: int, seed: int = 0) -> np.ndarray:
    """Token ids 1..VOCAB-1 with a different number of trailing zeros per row (row 0 unpadded)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (batch, STEPS)).astype(np.int32)
    for i in range(1, batch):
        length = 1 + (STEPS - 2 - (i - 1) * 2) % (STEPS - 1)  # 8, 6, 4, 2, 8, ...: every later row padded
        tokens[i, length:] = 0
    return tokens


ALL = {"lstm_stack": lstm_stack, "masked_join": masked_join}
