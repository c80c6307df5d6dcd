"""Small hand-built Keras models for partition and serving tests (built with a fixed seed)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from keras import layers, ops  # noqa: E402


def _seed() -> None:
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)


def residual() -> keras.Model:
    _seed()
    x = keras.Input((8, 8, 4), name="image")
    y = layers.Conv2D(4, 3, padding="same", name="conv_a")(x)
    y = layers.BatchNormalization(name="bn_a")(y)
    y = layers.ReLU(name="relu_a")(y)
    y = layers.Conv2D(4, 3, padding="same", name="conv_b")(y)
    y = layers.Add(name="skip_add")([x, y])
    y = layers.GlobalAveragePooling2D(name="gap")(y)
    out = layers.Dense(3, activation="softmax", name="probs")(y)
    return keras.Model(x, out, name="residual")


def inception() -> keras.Model:
    _seed()
    x = keras.Input((8, 8, 3), name="image")
    a = layers.Conv2D(4, 1, name="branch_a")(x)
    b = layers.Conv2D(4, 1, name="branch_b1")(x)
    b = layers.Conv2D(4, 3, padding="same", name="branch_b2")(b)
    c = layers.MaxPooling2D(3, strides=1, padding="same", name="branch_c1")(x)
    c = layers.Conv2D(4, 1, name="branch_c2")(c)
    y = layers.Concatenate(name="concat")([a, b, c])
    y = layers.GlobalAveragePooling2D(name="gap")(y)
    out = layers.Dense(5, name="logits")(y)
    return keras.Model(x, out, name="inception")


def two_in_two_out() -> keras.Model:
    _seed()
    a = keras.Input((6,), name="left")
    b = keras.Input((4,), name="right")
    ha = layers.Dense(8, activation="relu", name="left_dense")(a)
    hb = layers.Dense(8, activation="relu", name="right_dense")(b)
    h = layers.Multiply(name="mix")([ha, hb])
    h = h * 0.5 + 1.0  # keras.ops nodes that are not layers
    out1 = layers.Dense(3, name="head_one")(h)
    out2 = layers.Dense(2, name="head_two")(layers.Concatenate(name="cat")([h, hb]))
    return keras.Model([a, b], [out1, out2], name="two_in_two_out")


def dict_io() -> keras.Model:
    _seed()
    a = keras.Input((5,), name="alpha")
    b = keras.Input((5,), name="beta")
    h = layers.Dense(6, name="d1")(ops.add(a, b))
    out = {"score": layers.Dense(1, name="score_head")(h), "embed": layers.Dense(4, name="embed_head")(h)}
    return keras.Model({"beta": b, "alpha": a}, out, name="dict_io")


def nested_twice() -> keras.Model:
    _seed()
    ix = keras.Input((6,), name="inner_in")
    iy = layers.Dense(6, activation="tanh", name="inner_dense")(ix)
    iy = layers.Dense(6, name="inner_dense2")(iy) + ix
    inner = keras.Model(ix, iy, name="block")
    x = keras.Input((6,), name="x")
    y = inner(x)
    y = layers.ReLU(name="mid_relu")(y)
    y = inner(y)
    out = layers.Dense(2, name="out")(y)
    return keras.Model(x, out, name="nested_twice")


def shared_layer() -> keras.Model:
    _seed()
    x = keras.Input((7,), name="x")
    shared = layers.Dense(7, activation="relu", name="shared")
    y = shared(x)
    y = layers.Dense(7, name="between")(y)
    y = shared(y)
    out = layers.Dense(3, name="out")(ops.concatenate([y, x], axis=-1))
    return keras.Model(x, out, name="shared_layer")


def sequential() -> keras.Model:
    _seed()
    return keras.Sequential(
        [
            keras.Input((10,), name="seq_in"),
            layers.Dense(16, activation="relu", name="s1"),
            layers.Dense(16, activation="relu", name="s2"),
            layers.Dropout(0.5, name="drop"),
            layers.Dense(4, name="s_out"),
        ],
        name="sequential",
    )


def nested_sequential() -> keras.Model:
    _seed()
    inner = keras.Sequential([keras.Input((5,)), layers.Dense(5, activation="relu", name="q1"), layers.Dense(5, name="q2")], name="inner_seq")
    x = keras.Input((5,), name="x")
    y = inner(x)
    y = layers.Add(name="plus")([y, x])
    return keras.Model(x, layers.Dense(2, name="out")(y), name="nested_sequential")


def squeeze_excite() -> keras.Model:
    """A MobileNetV3-style squeeze-excite block with hard_sigmoid (x + 3.0, * 1/6): join without its fork."""
    _seed()
    x = keras.Input((8, 8, 8), name="image")
    y = layers.Conv2D(8, 1, name="expand")(x)
    s = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(y)
    s = layers.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = layers.Conv2D(8, 1, name="se_expand")(s)
    s = layers.ReLU(6.0, name="se_relu6")(s + 3.0) * (1.0 / 6.0)
    y = layers.Multiply(name="se_mul")([y, s])
    out = layers.Dense(3, name="out")(layers.GlobalAveragePooling2D(name="gap")(y))
    return keras.Model(x, out, name="squeeze_excite")


ALL = {
    "residual": residual,
    "inception": inception,
    "two_in_two_out": two_in_two_out,
    "dict_io": dict_io,
    "nested_twice": nested_twice,
    "shared_layer": shared_layer,
    "sequential": sequential,
    "nested_sequential": nested_sequential,
    "squeeze_excite": squeeze_excite,
}
