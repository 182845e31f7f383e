"""Communication accounting: the ledger of bytes per round, client and direction, counted on
Flower's serialized records the way the FlowerTune board counts them (see `ledger.py`).

Public API:

- ledger: the communication ledger of a run
  - Ledger: running totals plus the JSON Lines file, one line per client per round
  - LedgerEntry: one client's bytes in one round, both directions
  - array_record_bytes: board-compatible bytes of one ArrayRecord
  - record_payload_bytes: payload bytes and array count over a message's records
  - record_wire_bytes: size of a RecordDict as Flower serializes it for the wire
- targets: Cost-to-Target and Quality-under-Budget over a run's held-out loss by bytes
  - CurvePoint: one evaluated round as (round, cumulative bytes, held-out loss)
  - curve: a run's evaluated rounds as CurvePoints, in round order
  - cost_to_target: bytes by the first round at or below a target loss
  - quality_under_budget: the lowest loss within a byte budget
  - fewer_bytes: a reference's total bytes over a cost-to-target
"""

__all__: list[str] = ["ledger", "targets"]
