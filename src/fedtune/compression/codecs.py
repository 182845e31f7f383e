"""Adapter message codecs: what crosses the wire in each direction, byte for byte.

A codec is a chain of small stages, written as a spec string such as `delta,top-k=0.05,int8,zstd`:

- `delta` (uplink only): the client sends its adapter minus the global adapter it received; the
  server adds it back to the global it sent. A lossy downlink therefore never biases the update.
- `top-k=F`: per tensor, keep the ⌈F·n⌉ entries of largest magnitude; their indices travel
  (uint16 when the tensor has at most 65,536 entries, else uint32), the rest are zero.
- `low-rank=K`: per matrix (2-D tensor) of m×n with K < min(m, n), its best rank-K approximation
  (truncated SVD) as two factors, U·S (m×K) then Vᵀ (K×n), in the value format: (m + n)·K values
  instead of m·n; the receiver multiplies them back. Other tensors go dense. Not with top-k.
- one value format for the dense tensor or the kept values: `fp32` (lossless, the default),
  `fp16`, `bf16` (round to nearest even), `int8`, `int4` or `int2`: symmetric block quantization
  with one fp16 scale per `compress.block-size` values (scale = the block's largest magnitude / 127,
  / 7 or / 1, rounded up to fp16), round to nearest or, with `compress.stochastic-rounding`,
  stochastically (unbiased; seeded per round and client, so runs stay reproducible). int4 packs two
  codes per byte; int2 is ternary (−1, 0, +1 times the scale) in two bits, four per byte — with
  stochastic rounding and error feedback it is an unbiased 2.25-bit code.
- `zstd` or `zstd=L`: lossless Zstandard over the whole payload (level L, default 3).

Error feedback (`compress.error-feedback`, uplink, with a lossy codec): the client adds the residual
it kept from its previous round to what it sends, and keeps the new residual (what the codec lost).

Bounds per element, which the tests check: fp16 relative 2⁻¹¹ (normal range), bf16 relative 2⁻⁸,
int8/int4 at most half a quantization step (scale/2; one step with stochastic rounding); top-k
drops the smallest entries exactly.

A message is one ArrayRecord holding one raw byte array (`stype` "fedtune.codec", no .npy header):
an 8-byte header (magic, format version, and a CRC-32 of the tensor names and shapes both sides
already know, so a mismatch is refused instead of misread) and then each tensor in order. The
ledger counts `len(data)`, so scales, indices and the header are all paid for.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

STYPE = "fedtune.codec"
PAYLOAD_KEY = "fedtune.codec"
MAGIC = b"FT"
FORMAT_VERSION = 1
VALUE_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "int2")
QUANT_LEVELS = {"int8": 127, "int4": 7, "int2": 1}  # symmetric: codes −L..L
QUANT_BITS = {"int8": 8, "int4": 4, "int2": 2}  # bits a code takes on the wire


class CodecError(ValueError):
    """A codec spec that cannot be built, or a payload that cannot be decoded."""


@dataclass(frozen=True)
class CodecSpec:
    """One direction's codec (see the module docstring)."""

    delta: bool = False
    top_k: float = 0.0  # fraction kept per tensor; 0 = dense
    low_rank: int = 0  # rank of each matrix's factors; 0 = dense
    values: str = "fp32"
    zstd: int = 0  # level; 0 = off
    block_size: int = 64
    stochastic: bool = False
    error_feedback: bool = False

    @property
    def identity(self) -> bool:
        """Sends the fp32 adapter as it is (the board's plain ArrayRecord, no codec payload)."""
        return not (self.delta or self.top_k or self.low_rank or self.values != "fp32" or self.zstd)

    @property
    def lossy(self) -> bool:
        return bool(self.top_k) or bool(self.low_rank) or self.values != "fp32"

    def describe(self) -> str:
        """The canonical spec string (what parse_spec reads back)."""
        parts = ["delta"] if self.delta else []
        if self.top_k:
            parts.append(f"top-k={self.top_k:g}")
        if self.low_rank:
            parts.append(f"low-rank={self.low_rank}")
        parts.append(self.values)
        if self.zstd:
            parts.append(f"zstd={self.zstd}")
        text = ",".join(parts)
        if self.values in QUANT_LEVELS:
            text += f" (blocks of {self.block_size}" + (", stochastic)" if self.stochastic else ")")
        if self.error_feedback:
            text += " + error feedback"
        return text


def parse_spec(
    text: str,
    *,
    block_size: int = 64,
    stochastic: bool = False,
    error_feedback: bool = False,
    direction: str = "uplink",
) -> CodecSpec:
    """Build a CodecSpec from `delta,top-k=0.05,int8,zstd`-style text.

    Raises:
        CodecError: an unknown stage, a bad value, two value formats, or a stage the direction
            cannot use (delta and error feedback are uplink-only).
    """
    spec = CodecSpec(block_size=block_size, stochastic=stochastic)
    seen_values = False
    for raw in (item.strip() for item in text.split(",")):
        if not raw:
            continue
        name, _, value = raw.partition("=")
        name = name.strip().lower()
        value = value.strip()
        if name in VALUE_FORMATS and not value:
            if seen_values:
                raise CodecError(f"{text!r}: more than one value format")
            spec, seen_values = replace(spec, values=name), True
        elif name == "delta" and not value:
            spec = replace(spec, delta=True)
        elif name == "top-k":
            try:
                fraction = float(value)
            except ValueError:
                raise CodecError(f"{text!r}: top-k needs a fraction, e.g. top-k=0.05") from None
            if not 0 < fraction < 1:
                raise CodecError(f"{text!r}: top-k fraction must be in (0, 1), got {fraction}")
            spec = replace(spec, top_k=fraction)
        elif name == "low-rank":
            if not value.isdigit() or int(value) < 1:
                raise CodecError(f"{text!r}: low-rank needs a rank >= 1, e.g. low-rank=4")
            spec = replace(spec, low_rank=int(value))
        elif name == "zstd":
            level = int(value) if value.lstrip("-").isdigit() else (3 if not value else None)
            if level is None or not 1 <= level <= 22:
                raise CodecError(f"{text!r}: zstd level must be 1..22")
            spec = replace(spec, zstd=level)
        else:
            raise CodecError(
                f"{text!r}: unknown stage {raw!r} (stages: delta, top-k=F, low-rank=K, "
                f"{'/'.join(VALUE_FORMATS)}, zstd[=L])"
            )
    if block_size < 1:
        raise CodecError(f"block size must be >= 1, got {block_size}")
    if spec.top_k and spec.low_rank:
        raise CodecError(f"{text!r}: top-k and low-rank do not combine (one or the other)")
    if direction == "downlink" and spec.delta:
        raise CodecError(f"{text!r}: delta is uplink-only (a node may have missed earlier globals)")
    if error_feedback:
        if direction != "uplink":
            raise CodecError("error feedback is uplink-only")
        if not spec.lossy:
            raise CodecError(
                f"{text!r}: error feedback needs a lossy codec (top-k, low-rank or < fp32)"
            )
        spec = replace(spec, error_feedback=True)
    return spec


# --------------------------------------------------------------------------------------------
# Value formats
# --------------------------------------------------------------------------------------------


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, rounded to nearest even."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def _block_scales(values: np.ndarray, block: int, levels: int) -> np.ndarray:
    """fp16 scale per block, never below the block's largest magnitude / levels."""
    blocks = math.ceil(values.size / block)
    padded = np.zeros(blocks * block, dtype=np.float32)
    padded[: values.size] = np.abs(values)
    wanted = padded.reshape(blocks, block).max(axis=1) / levels
    scales = wanted.astype(np.float16)
    low = scales.astype(np.float32) < wanted
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    return scales


def _quantize(values: np.ndarray, spec: CodecSpec, rng: np.random.Generator | None) -> bytes:
    levels = QUANT_LEVELS[spec.values]
    scales = _block_scales(values, spec.block_size, levels)
    per_value = np.repeat(scales.astype(np.float32), spec.block_size)[: values.size]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(per_value > 0, values / per_value, 0.0)
    if spec.stochastic:
        if rng is None:
            raise CodecError("stochastic rounding needs a seeded generator")
        q = np.floor(scaled + rng.random(values.size, dtype=np.float32))
    else:
        q = np.rint(scaled)
    q = np.clip(q, -levels, levels).astype(np.int8)
    bits = QUANT_BITS[spec.values]
    if bits == 8:
        body = q.tobytes()
    else:  # 8 // bits codes per byte, the first in the low bits, each offset to 0..2L
        per_byte = 8 // bits
        codes = np.full(math.ceil(q.size / per_byte) * per_byte, levels, dtype=np.uint8)
        codes[: q.size] = (q + levels).astype(np.uint8)
        packed = np.zeros(codes.size // per_byte, dtype=np.uint8)
        for slot in range(per_byte):
            packed |= codes[slot::per_byte] << (slot * bits)
        body = packed.tobytes()
    return scales.astype("<f2").tobytes() + body


def _value_bytes(count: int, spec: CodecSpec) -> int:
    if spec.values == "fp32":
        return 4 * count
    if spec.values in ("fp16", "bf16"):
        return 2 * count
    scales = 2 * math.ceil(count / spec.block_size)
    return scales + math.ceil(count * QUANT_BITS[spec.values] / 8)


def _encode_values(values: np.ndarray, spec: CodecSpec, rng: np.random.Generator | None) -> bytes:
    if spec.values == "fp32":
        return values.astype("<f4").tobytes()
    if spec.values == "fp16":
        return values.astype("<f2").tobytes()
    if spec.values == "bf16":
        return _bf16_bits(values).tobytes()
    return _quantize(values, spec, rng)


def _decode_values(data: bytes, count: int, spec: CodecSpec) -> np.ndarray:
    if spec.values == "fp32":
        return np.frombuffer(data, dtype="<f4", count=count).astype(np.float32)
    if spec.values == "fp16":
        return np.frombuffer(data, dtype="<f2", count=count).astype(np.float32)
    if spec.values == "bf16":
        bits = np.frombuffer(data, dtype="<u2", count=count).astype(np.uint32) << 16
        return bits.astype("<u4").view("<f4").astype(np.float32)
    blocks = math.ceil(count / spec.block_size)
    scales = np.frombuffer(data, dtype="<f2", count=blocks).astype(np.float32)
    body = np.frombuffer(data, dtype=np.uint8, offset=2 * blocks)
    width, levels = QUANT_BITS[spec.values], QUANT_LEVELS[spec.values]
    if width == 8:
        q = body[:count].view(np.int8).astype(np.float32)
    else:
        per_byte = 8 // width
        codes = np.empty(body.size * per_byte, dtype=np.int16)
        for slot in range(per_byte):
            codes[slot::per_byte] = (body >> (slot * width)) & ((1 << width) - 1)
        q = (codes[:count] - levels).astype(np.float32)
    return q * np.repeat(scales, spec.block_size)[:count]


# --------------------------------------------------------------------------------------------
# Tensors ↔ payload
# --------------------------------------------------------------------------------------------


def layout_crc(layout: Mapping[str, tuple[int, ...]]) -> int:
    text = "\n".join(f"{k}:{'x'.join(map(str, s))}" for k, s in layout.items())
    return zlib.crc32(text.encode("utf-8"))


def _factored(shape: tuple[int, ...], spec: CodecSpec) -> bool:
    """Whether `low-rank` sends this tensor as two factors (a matrix it makes smaller)."""
    return bool(spec.low_rank) and len(shape) == 2 and spec.low_rank < min(shape)


def _low_rank_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """U·S (m×rank) and Vᵀ (rank×n) of the matrix's truncated SVD (computed in float64)."""
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]).astype(np.float32), vt[:rank, :].astype(np.float32)


def _kept(size: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * size))


def _index_dtype(size: int) -> str:
    return "<u2" if size <= 1 << 16 else "<u4"


def encode_payload(
    tensors: Mapping[str, np.ndarray], spec: CodecSpec, rng: np.random.Generator | None = None
) -> bytes:
    """Serialize float tensors (in the mapping's order) under `spec` (delta already applied)."""
    layout = {k: tuple(int(d) for d in v.shape) for k, v in tensors.items()}
    parts = [MAGIC, struct.pack("<BxI", FORMAT_VERSION, layout_crc(layout))]
    for values in tensors.values():
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if _factored(values.shape, spec):
            left, right = _low_rank_factors(np.asarray(values, dtype=np.float32), spec.low_rank)
            parts.append(_encode_values(left.reshape(-1), spec, rng))
            parts.append(_encode_values(right.reshape(-1), spec, rng))
            continue
        if spec.top_k:
            k = _kept(flat.size, spec.top_k)
            index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
            parts.append(index.astype(_index_dtype(flat.size)).tobytes())
            flat = flat[index]
        parts.append(_encode_values(flat, spec, rng))
    blob = b"".join(parts)
    if spec.zstd:
        import zstandard

        blob = MAGIC + b"Z" + zstandard.ZstdCompressor(level=spec.zstd).compress(blob)
    return blob


def decode_payload(
    blob: bytes, spec: CodecSpec, layout: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Float32 tensors from a payload; `layout` is name → shape, in the encoder's order.

    Raises:
        CodecError: not a fedtune payload, a different tensor layout, or a truncated payload.
    """
    if spec.zstd:
        import zstandard

        if not blob.startswith(MAGIC + b"Z"):
            raise CodecError("payload is not zstd-compressed as the codec says")
        try:
            blob = zstandard.ZstdDecompressor().decompress(blob[3:])
        except zstandard.ZstdError as exc:
            raise CodecError(f"payload does not decompress: {exc}") from None
    if len(blob) < 8 or not blob.startswith(MAGIC):
        raise CodecError("not a fedtune codec payload")
    version = blob[2]
    (crc,) = struct.unpack("<I", blob[4:8])
    if version != FORMAT_VERSION:
        raise CodecError(f"payload format {version}, this fedtune reads {FORMAT_VERSION}")
    if crc != layout_crc(layout):
        raise CodecError("payload was encoded for different tensors (names or shapes differ)")
    out: dict[str, np.ndarray] = {}
    offset = 8
    for key, shape in layout.items():
        size = math.prod(shape)
        if _factored(shape, spec):
            rows, cols = shape
            factors = []
            for count in (rows * spec.low_rank, spec.low_rank * cols):
                length = _value_bytes(count, spec)
                if offset + length > len(blob):
                    raise CodecError(f"payload is truncated at {key}")
                factors.append(_decode_values(blob[offset : offset + length], count, spec))
                offset += length
            left = factors[0].reshape(rows, spec.low_rank)
            right = factors[1].reshape(spec.low_rank, cols)
            out[key] = (left @ right).astype(np.float32)
            continue
        count = size
        index = None
        if spec.top_k:
            count = _kept(size, spec.top_k)
            width = np.dtype(_index_dtype(size)).itemsize * count
            index = np.frombuffer(blob, dtype=_index_dtype(size), count=count, offset=offset)
            offset += width
        length = _value_bytes(count, spec)
        if offset + length > len(blob):
            raise CodecError(f"payload is truncated at {key}")
        values = _decode_values(blob[offset : offset + length], count, spec)
        offset += length
        if index is not None:
            if index.size and int(index.max()) >= size:
                raise CodecError(f"payload index out of range in {key}")
            dense = np.zeros(size, dtype=np.float32)
            dense[index.astype(np.int64)] = values
            values = dense
        out[key] = values.reshape(shape)
    if offset != len(blob):
        raise CodecError(f"payload has {len(blob) - offset} bytes past its last tensor")
    return out


def payload_record(blob: bytes) -> Any:
    """The ArrayRecord that carries a payload: one raw byte array, counted at its length."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(
        {PAYLOAD_KEY: Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)}
    )


def record_payload(record: Any) -> bytes | None:
    """The payload of a codec record, or None for a plain (identity) ArrayRecord."""
    if list(record.keys()) != [PAYLOAD_KEY]:
        return None
    array = record[PAYLOAD_KEY]
    if array.stype != STYPE:
        raise CodecError(f"codec record with stype {array.stype!r}")
    return bytes(array.data)
