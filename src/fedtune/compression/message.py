"""A direction's codec applied to an adapter message: delta, error feedback, the ArrayRecord."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedtune.compression.codecs import (
    CodecError,
    CodecSpec,
    decode_payload,
    encode_payload,
    payload_record,
    record_payload,
)

Layout = Mapping[str, tuple[tuple[int, ...], str]]  # name → (shape, dtype name), in wire order


class MessageCodec:
    """Encode an adapter into a message's ArrayRecord and decode it back."""

    def __init__(self, spec: CodecSpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return "identity" if self.spec.identity else self.spec.describe()

    def encode(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        reference: Mapping[str, np.ndarray] | None = None,
        residual: Mapping[str, np.ndarray] | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[Any, dict[str, np.ndarray] | None]:
        """(ArrayRecord to send, the new error-feedback residual or None).

        Args:
            tensors: the adapter (name → array), in the layout's order.
            reference: the global adapter the sender received (needed by `delta`).
            residual: what the codec lost last time (error feedback); zeros when None.
            rng: seeded generator for stochastic rounding.
        """
        from flwr.app import Array, ArrayRecord

        spec = self.spec
        if spec.identity:
            return ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()}
            ), None
        values = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
        if spec.delta:
            if reference is None:
                raise CodecError("delta needs the global adapter the client received")
            values = {k: v - np.asarray(reference[k], dtype=np.float32) for k, v in values.items()}
        if spec.error_feedback and residual is not None:
            values = {k: v + residual[k] for k, v in values.items()}
        blob = encode_payload(values, spec, rng)
        new_residual = None
        if spec.error_feedback:
            layout = {k: (tuple(v.shape), "float32") for k, v in values.items()}
            sent = decode_payload(blob, spec, _shapes(layout))
            new_residual = {k: values[k] - sent[k] for k in values}
        return payload_record(blob), new_residual

    def decode(
        self,
        record: Any,
        layout: Layout,
        *,
        reference: Mapping[str, np.ndarray] | None = None,
    ) -> Any:
        """The adapter as an ArrayRecord in the layout's dtypes.

        Raises:
            CodecError: the record is not what this codec sends, or does not fit the layout.
        """
        from flwr.app import Array, ArrayRecord

        blob = record_payload(record)
        if self.spec.identity:
            if blob is not None:
                raise CodecError("a codec payload where plain arrays were expected")
            return record
        if blob is None:
            raise CodecError(f"plain arrays where the codec {self.name} was expected")
        values = decode_payload(blob, self.spec, _shapes(layout))
        if self.spec.delta:
            if reference is None:
                raise CodecError("delta needs the global adapter the server sent")
            values = {k: np.asarray(reference[k], dtype=np.float32) + v for k, v in values.items()}
        return ArrayRecord(
            {
                k: Array(values[k].astype(_numpy_dtype(dtype), copy=False))
                for k, (_, dtype) in layout.items()
            }
        )


def _shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    return {k: tuple(shape) for k, (shape, _) in layout.items()}


def _numpy_dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and other torch-only names: decoded values stay float32
        return np.dtype(np.float32)
