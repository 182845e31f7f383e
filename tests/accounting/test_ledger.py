"""Communication accounting: the FlowerTune tracker's byte count, the board's units, budgets."""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, RecordDict

from fedtune.accounting.ledger import (
    Ledger,
    LedgerEntry,
    record_payload_bytes,
    record_wire_bytes,
)
from fedtune.rundir import read_ledger
from fedtune.units import MIB, board_gb

NPY_HEADER = 128  # bytes of the .npy header of each serialized array (shapes like adapters')


def smollm2_dora_r8_qv() -> RecordDict:
    """The shapes of the board's SmolLM2-135M DoRA r=8 q,v adapter (30 layers, kv width 192)."""
    arrays = {}
    for layer in range(30):
        for proj, out in (("q_proj", 576), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            arrays[f"{prefix}.lora_A.weight"] = torch.zeros(8, 576)
            arrays[f"{prefix}.lora_B.weight"] = torch.zeros(out, 8)
            arrays[f"{prefix}.lora_magnitude_vector"] = torch.zeros(out)
    return RecordDict({"arrays": ArrayRecord(arrays)})


def test_payload_bytes_are_raw_tensors_plus_npy_headers():
    content = smollm2_dora_r8_qv()
    payload, count = record_payload_bytes(content)
    parameters = 30 * ((8 * 576 + 576 * 8 + 576) + (8 * 576 + 192 * 8 + 192))
    assert parameters == 483_840 and count == 180
    assert payload == parameters * 4 + count * NPY_HEADER == 1_958_400
    assert record_wire_bytes(content) > payload  # keys and framing on top


def test_board_figure_for_smollm2_dora_is_reproduced():
    payload, _ = record_payload_bytes(smollm2_dora_r8_qv())
    total = 100 * 2 * 2 * payload  # rounds × clients × directions
    assert round(total / MIB) == 747  # the protocol sheet's 747 MiB
    assert board_gb(total) == 0.7  # the board's "0.7 GB"


def test_ledger_totals_file_and_budget(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record([LedgerEntry(1, 11, 0, 100, 90, 2, 2, 150, 140), LedgerEntry(1, 12, 1, 100, 95)])
    ledger.record([LedgerEntry(2, 11, 0, 100, 100)])
    assert (ledger.downlink_bytes, ledger.uplink_bytes, ledger.total_bytes) == (300, 285, 585)
    assert ledger.per_round == {
        1: {"downlink": 200, "uplink": 185},
        2: {"downlink": 100, "uplink": 100},
    }
    rows = read_ledger(tmp_path)
    assert [r["node_id"] for r in rows] == [11, 12, 11]
    assert sum(r["downlink_bytes"] + r["uplink_bytes"] for r in rows) == 585
    assert not ledger.would_exceed(0, 10**12)  # 0 = no budget
    assert ledger.would_exceed(785, 201) and not ledger.would_exceed(785, 200)
    summary = ledger.summary()
    assert summary["total_bytes"] == 585 and json.dumps(summary)
