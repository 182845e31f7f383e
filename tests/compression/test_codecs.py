"""Codecs: each round trip within its documented bound, sizes as serialized, error feedback exact."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.accounting.ledger import array_record_bytes
from fedtune.compression.codecs import (
    CodecError,
    decode_payload,
    encode_payload,
    parse_spec,
)
from fedtune.compression.message import MessageCodec

pytestmark = pytest.mark.unit


def adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """LoRA-like tensors: sizes that are not multiples of the block, magnitudes over decades."""
    rng = np.random.default_rng(seed)
    return {
        "a.lora_A.weight": (rng.standard_normal((8, 100)) * 0.05).astype(np.float32),
        "a.lora_B.weight": (rng.standard_normal((70, 8)) * 1e-3).astype(np.float32),
        "b.lora_A.weight": (rng.standard_normal((8, 33)) * 3.0).astype(np.float32),
    }


def shapes(tensors):
    return {k: v.shape for k, v in tensors.items()}


def layout(tensors):
    return {k: (v.shape, "float32") for k, v in tensors.items()}


def round_trip(text: str, tensors, **kwargs):
    spec = parse_spec(text, **kwargs)
    blob = encode_payload(tensors, spec, np.random.default_rng(1))
    return spec, blob, decode_payload(blob, spec, shapes(tensors))


@pytest.mark.parametrize("fmt,relative", [("fp16", 2**-11), ("bf16", 2**-8)])
def test_float_formats_are_within_their_relative_bound(fmt, relative):
    tensors = adapter()
    _, _, back = round_trip(fmt, tensors)
    for key, values in tensors.items():
        # relative in the normal range; below it, half the smallest spacing (fp16: 2^-25)
        floor = 2**-25 if fmt == "fp16" else 1e-38
        assert np.all(np.abs(back[key] - values) <= relative * np.abs(values) + floor), key


def test_fp32_payload_is_lossless():
    tensors = adapter()
    _, _, back = round_trip("fp32,zstd", tensors)
    for key, values in tensors.items():
        assert np.array_equal(back[key], values)


@pytest.mark.parametrize("fmt,levels", [("int8", 127), ("int4", 7), ("int2", 1)])
@pytest.mark.parametrize("block", [64, 16])
def test_block_quantization_is_within_half_a_step(fmt, levels, block):
    tensors = adapter()
    _, _, back = round_trip(fmt, tensors, block_size=block)
    for key, values in tensors.items():
        flat, got = values.reshape(-1), back[key].reshape(-1)
        for start in range(0, flat.size, block):
            chunk = flat[start : start + block]
            step = np.float32(np.float16(np.abs(chunk).max() / levels))
            step = max(step, np.abs(chunk).max() / levels)  # the scale is rounded up, never down
            error = np.abs(got[start : start + block] - chunk)
            assert error.max() <= step * 0.5 * (1 + 2**-10) + 1e-12, (key, start)


def test_stochastic_rounding_is_seeded_unbiased_and_within_one_step():
    values = {"w": np.full((1, 4096), 0.3, dtype=np.float32)}
    values["w"][0, 0] = 1.0  # sets the scale: 1/7; 0.3 lies between levels 2/7 and 3/7
    spec = parse_spec("int4", stochastic=True, block_size=4096)
    first = encode_payload(values, spec, np.random.default_rng(7))
    assert first == encode_payload(values, spec, np.random.default_rng(7))
    back = decode_payload(first, spec, shapes(values))["w"][0, 1:]
    step = np.float32(np.float16(1 / 7))
    assert np.abs(back - 0.3).max() <= step * (1 + 1e-3)
    assert set(np.round(back / step).astype(int)) == {2, 3}
    assert abs(float(back.mean()) - 0.3) < 0.01  # unbiased; round-to-nearest would give 2/7


def test_int2_is_ternary_packed_four_a_byte_and_unbiased_with_stochastic_rounding():
    # Every code −1, 0, +1 in every slot of a byte, and a tail that does not fill its byte.
    values = {"w": np.array([[1.0, -1.0, 0.0, 0.4, -0.6, 0.2, 1.0]], dtype=np.float32)}
    spec = parse_spec("int2", block_size=64)
    blob = encode_payload(values, spec)
    assert len(blob) == 8 + 2 + 2  # header, one fp16 scale, 7 codes in 2 bytes
    back = decode_payload(blob, spec, shapes(values))["w"]
    assert back.tolist() == [[1.0, -1.0, 0.0, 0.0, -1.0, 0.0, 1.0]]
    # Stochastic: 0.3 of the scale becomes +1 about 30 % of the time, 0 otherwise; mean kept.
    values = {"w": np.full((1, 4096), 0.3, dtype=np.float32)}
    values["w"][0, 0] = 1.0
    spec = parse_spec("int2", stochastic=True, block_size=4096)
    back = decode_payload(encode_payload(values, spec, np.random.default_rng(3)), spec,
                          shapes(values))["w"][0, 1:]  # fmt: skip
    assert set(np.unique(back).tolist()) == {0.0, 1.0}
    assert abs(float(back.mean()) - 0.3) < 0.02


def test_low_rank_sends_each_matrix_as_its_best_rank_k_factors():
    rng = np.random.default_rng(4)
    exact = (rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30))).astype(np.float32)
    full = rng.standard_normal((32, 32)).astype(np.float32)
    tensors = {"rank3": exact, "full": full, "vector": rng.standard_normal(50).astype(np.float32),
               "thin": rng.standard_normal((2, 64)).astype(np.float32)}  # fmt: skip
    spec, blob, back = round_trip("low-rank=3", tensors)
    # (m + n)·k fp32 values for the two matrices it makes smaller; the rest dense.
    assert len(blob) == 8 + 4 * ((40 + 30) * 3 + (32 + 32) * 3 + 50 + 2 * 64)
    np.testing.assert_allclose(back["rank3"], exact, atol=1e-5)  # rank 3: nothing lost
    assert np.array_equal(back["vector"], tensors["vector"])
    assert np.array_equal(back["thin"], tensors["thin"])  # rank 2 < 3: sent as it is
    # A full-rank matrix: the error is exactly what its discarded singular values hold.
    singular = np.linalg.svd(full.astype(np.float64), compute_uv=False)
    lost = np.linalg.norm(back["full"].astype(np.float64) - full)
    assert lost == pytest.approx(np.sqrt((singular[3:] ** 2).sum()), rel=1e-5)
    # With a value format the factors are quantized; sizes as serialized.
    _, blob8, _ = round_trip("low-rank=3,int8", {"full": full}, block_size=64)
    assert len(blob8) == 8 + sum(n + 2 * math.ceil(n / 64) for n in (32 * 3, 3 * 32))


def test_top_k_keeps_exactly_the_largest_entries():
    tensors = adapter()
    _, _, back = round_trip("top-k=0.1,fp32", tensors)
    for key, values in tensors.items():
        flat, got = values.reshape(-1), back[key].reshape(-1)
        k = math.ceil(0.1 * flat.size)
        kept = np.nonzero(got)[0]
        assert kept.size == k
        assert np.array_equal(got[kept], flat[kept])
        assert np.abs(flat[kept]).min() >= np.delete(np.abs(flat), kept).max()


@pytest.mark.parametrize(
    "text",
    ["fp32", "fp16", "bf16", "int8", "int4", "int2", "top-k=0.05,int8", "top-k=0.3,bf16",
     "top-k=0.1,int2"],
)  # fmt: skip
def test_payload_size_is_what_is_serialized(text):
    tensors = adapter()
    spec = parse_spec(text, block_size=32)
    blob = encode_payload(tensors, spec)
    expected = 8  # magic, version, layout CRC
    for values in tensors.values():
        n = values.size
        count = math.ceil(spec.top_k * n) if spec.top_k else n
        if spec.top_k:
            expected += 2 * count  # uint16 indices: every tensor here has < 65,536 entries
        expected += {
            "fp32": 4 * count,
            "fp16": 2 * count,
            "bf16": 2 * count,
            "int8": count + 2 * math.ceil(count / 32),
            "int4": math.ceil(count / 2) + 2 * math.ceil(count / 32),
            "int2": math.ceil(count / 4) + 2 * math.ceil(count / 32),
        }[spec.values]
    assert len(blob) == expected
    if not spec.identity:  # (identity sends the plain arrays: the board's own message)
        record, _ = MessageCodec(spec).encode(tensors)
        assert array_record_bytes(record) == len(blob)  # the ledger counts every byte of it


def test_quantized_and_sparse_payloads_are_much_smaller_than_fp32():
    tensors = adapter()
    fp32 = len(encode_payload(tensors, parse_spec("fp32")))
    assert len(encode_payload(tensors, parse_spec("int8"))) < fp32 / 3.5
    assert len(encode_payload(tensors, parse_spec("int4"))) < fp32 / 6.5
    assert len(encode_payload(tensors, parse_spec("int2"))) < fp32 / 12
    assert len(encode_payload(tensors, parse_spec("top-k=0.05,int8,zstd"))) < fp32 / 20


@pytest.mark.parametrize("lossy", ["top-k=0.1,int4", "low-rank=2,int4"])
def test_error_feedback_carries_exactly_the_residual(lossy):
    codec = MessageCodec(parse_spec(f"delta,{lossy}", error_feedback=True))
    reference = adapter(0)
    first, second = adapter(1), adapter(2)
    record, residual = codec.encode(first, reference=reference)
    sent = codec.decode(record, layout(first), reference=reference)
    decoded = decode_payload(bytes(record["fedtune.codec"].data), codec.spec, shapes(first))
    for key in first:
        delta = first[key] - reference[key]
        # what was lost this round, bit for bit: the delta less what the payload carries
        assert np.array_equal(residual[key], delta - decoded[key])
    record2, residual2 = codec.encode(second, reference=reference, residual=residual)
    # The second message is the codec applied to (update + residual), nothing else.
    carried = {k: (second[k] - reference[k]) + residual[k] for k in second}
    plain = MessageCodec(parse_spec(lossy))
    expected, _ = plain.encode(carried)
    assert record2["fedtune.codec"].data == expected["fedtune.codec"].data
    # Nothing is lost over the two rounds but the last residual.
    sent2 = codec.decode(record2, layout(second), reference=reference)
    for key in first:
        total_sent = (sent[key].numpy() - reference[key]) + (sent2[key].numpy() - reference[key])
        total_meant = (first[key] - reference[key]) + (second[key] - reference[key])
        np.testing.assert_allclose(total_sent + residual2[key], total_meant, atol=1e-6)


def test_delta_is_decoded_against_the_reference():
    codec = MessageCodec(parse_spec("delta,int8"))
    reference, tensors = adapter(0), adapter(1)
    record, _ = codec.encode(tensors, reference=reference)
    back = codec.decode(record, layout(tensors), reference=reference)
    for key in tensors:
        step = np.abs(tensors[key] - reference[key]).max() / 127
        assert np.abs(back[key].numpy() - tensors[key]).max() <= step * 0.51 + 1e-7


def test_identity_sends_the_plain_arrays():
    codec = MessageCodec(parse_spec("fp32"))
    tensors = adapter()
    record, residual = codec.encode(tensors)
    assert residual is None and sorted(record.keys()) == sorted(tensors)
    assert codec.decode(record, layout(tensors)) is record


def test_bad_payloads_are_refused():
    tensors = adapter()
    codec = MessageCodec(parse_spec("int8"))
    record, _ = codec.encode(tensors)
    other = dict(tensors, extra=np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(CodecError, match="different tensors"):
        codec.decode(record, layout(other))
    blob = record["fedtune.codec"].data
    spec = parse_spec("int8")
    with pytest.raises(CodecError, match="truncated"):
        decode_payload(blob[:-10], spec, shapes(tensors))
    with pytest.raises(CodecError, match="past its last tensor"):
        decode_payload(blob + b"\0", spec, shapes(tensors))
    with pytest.raises(CodecError, match="not a fedtune codec payload"):
        decode_payload(b"garbage!", spec, shapes(tensors))
    with pytest.raises(CodecError, match="plain arrays"):
        codec.decode(MessageCodec(parse_spec("fp32")).encode(tensors)[0], layout(tensors))
    with pytest.raises(CodecError, match="codec payload where plain"):
        MessageCodec(parse_spec("fp32")).decode(record, layout(tensors))


@pytest.mark.parametrize(
    "text,kwargs,message",
    [
        ("int8,int4", {}, "more than one value format"),
        ("top-k=2", {}, "fraction must be in"),
        ("top-k=x", {}, "needs a fraction"),
        ("zstd=40", {}, "level"),
        ("gzip", {}, "unknown stage"),
        ("delta,int8", {"direction": "downlink"}, "uplink-only"),
        ("fp32", {"error_feedback": True}, "needs a lossy codec"),
        ("low-rank=0", {}, "needs a rank >= 1"),
        ("low-rank=x", {}, "needs a rank >= 1"),
        ("top-k=0.1,low-rank=2", {}, "do not combine"),
    ],
)
def test_bad_specs_are_refused(text, kwargs, message):
    with pytest.raises(CodecError, match=message):
        parse_spec(text, **kwargs)


def test_spec_text_round_trips():
    assert parse_spec("delta,low-rank=4,int2").describe() == "delta,low-rank=4,int2 (blocks of 64)"
    spec = parse_spec(" delta , top-k=0.05 , int4 , zstd ", stochastic=True)
    assert spec.describe() == "delta,top-k=0.05,int4,zstd=3 (blocks of 64, stochastic)"
    assert parse_spec("delta,top-k=0.05,int4,zstd=3", stochastic=True) == spec
    assert parse_spec("").identity and parse_spec("fp32").identity
    assert not parse_spec("fp32,zstd").identity


@pytest.mark.parametrize(
    "text",
    ["fp32", "int8", "delta,int8,zstd", "delta,top-k=0.05,int4,zstd", "fp16,zstd",
     "delta,low-rank=2,int8,zstd"],
)  # fmt: skip
def test_the_budget_never_undercounts_a_first_reply(text):
    """Before any reply, the byte budget estimates one from the global adapter; a real reply
    (any values, here random) must not be larger than that estimate."""
    from types import SimpleNamespace

    from flwr.app import Array, ArrayRecord

    from fedtune.federation.rounds import LoopState, expected_uplink_bytes

    tensors = adapter(0)
    arrays = ArrayRecord({k: Array(v) for k, v in tensors.items()})
    codec = MessageCodec(parse_spec(text))
    plain = SimpleNamespace(uplink=codec, strategy=SimpleNamespace())
    estimate = expected_uplink_bytes(plain, LoopState(arrays), arrays)
    # A strategy whose replies carry an extra fp32 record in the adapter's layout (SCAFFOLD's
    # Δcᵢ) makes each reply dearer by exactly that record.
    scaffold = SimpleNamespace(uplink=codec, strategy=SimpleNamespace(reply_records=("extra",)))
    with_extra = expected_uplink_bytes(scaffold, LoopState(arrays), arrays)
    assert with_extra == estimate + array_record_bytes(arrays)
    trained = {
        k: v + np.random.default_rng(3).standard_normal(v.shape).astype(np.float32)
        for k, v in tensors.items()
    }
    record, _ = codec.encode(trained, reference=tensors, rng=np.random.default_rng(0))
    assert array_record_bytes(record) <= estimate
    if "zstd" not in text:
        assert array_record_bytes(record) == estimate  # fixed-size codecs: exact
