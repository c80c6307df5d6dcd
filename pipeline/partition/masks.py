"""Keras masks across cuts.

A Keras mask (``Embedding(mask_zero=True)``, ``Masking``, ...) is not part of
a tensor's value: it rides along as the ``_keras_mask`` attribute, and the
layers downstream read it. Between two processes only values travel, so a
tensor that carries a mask crosses a cut together with its mask, sent as a
boolean tensor of its own named ``<tensor>:mask`` in the same message:

- the sending shard's sub-model takes the mask off the tensor with
  :class:`ExportMask` and returns it as one more output;
- the receiving shard's sub-model takes it as one more input and puts it back
  on the tensor with :class:`AttachMask`, whose ``compute_mask`` returns it, so
  the next layers see exactly the mask they see in the whole model.

Both layers are registered (``pipeline>AttachMask``, ``pipeline>ExportMask``),
so shard files holding them load in Keras safe mode once this module is
imported; every loader in the project imports it (see
:mod:`pipeline.custom_objects`).
"""

from __future__ import annotations

from typing import Any

import keras

#: the suffix of a mask tensor's name: ``<tensor>:mask``.
MASK_SUFFIX = ":mask"
#: the package the layers are registered under (``pipeline>AttachMask``).
PACKAGE = "pipeline"


def mask_name(tensor: str) -> str:
    """The name of the tensor that carries ``tensor``'s mask across a cut."""
    return tensor + MASK_SUFFIX


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttachMask(keras.layers.Layer):
    """``(tensor, mask) -> tensor``, with ``mask`` attached as the tensor's Keras mask.

    The value is passed through unchanged (no arithmetic, so nothing can change
    a bit); only the mask metadata is set, through ``compute_mask``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        tensor, _mask = inputs
        return tensor

    def compute_mask(self, inputs: Any, previous_mask: Any = None) -> Any:
        _tensor, mask = inputs
        return keras.ops.cast(mask, "bool")

    def compute_output_spec(self, inputs: Any) -> Any:
        tensor, _mask = inputs
        return keras.KerasTensor(tensor.shape, dtype=tensor.dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ExportMask(keras.layers.Layer):
    """``tensor -> its Keras mask`` as a boolean tensor (the value the next shard needs)."""

    def __init__(self, mask_shape: tuple[int | None, ...] | list[int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True  # the mask argument is filled in; the output itself carries none
        self.mask_shape = None if mask_shape is None else tuple(mask_shape)

    def call(self, inputs: Any, mask: Any = None) -> Any:
        if mask is None:
            raise ValueError(
                f"{self.name}: the tensor arrived without the Keras mask it carries in the whole model; "
                "expected a mask to send across the cut, received none"
            )
        return keras.ops.cast(mask, "bool")

    def compute_mask(self, inputs: Any, previous_mask: Any = None) -> Any:
        return None

    def compute_output_spec(self, inputs: Any, mask: Any = None) -> Any:
        shape = self.mask_shape if self.mask_shape is not None else (mask.shape if mask is not None else inputs.shape[:-1])
        return keras.KerasTensor(tuple(shape), dtype="bool")

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["mask_shape"] = None if self.mask_shape is None else list(self.mask_shape)
        return config

