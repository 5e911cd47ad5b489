"""The worker's ledger is bounded: past its size limit it keeps only the starts within the
retention, and it still refuses what it ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.ledger import Ledger

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def test_the_ledger_is_compacted_past_its_size_and_still_refuses_recent_runs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.jsonl"
    old = [{"at": 1.0, "event": "started", "run_id": f"old{i}", "fence": i} for i in range(50)]
    path.write_text("".join(json.dumps(e) + "\n" for e in old))
    ledger = Ledger(path, max_bytes=20_000, keep_s=3600)
    for index in range(400):
        ledger.record("started", f"r{index}", index)
        ledger.record("finished", f"r{index}", index, status="succeeded")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # Compacted: far fewer lines than the 850 written, none past the retention.
    assert len(lines) < 600 and all(line["at"] > 1.0 for line in lines)
    assert all(ledger.already_ran(f"r{index}") for index in range(400))
    assert not ledger.already_ran("old0")  # past the retention: the store refuses it
    ledger.close()
    again = Ledger(path, max_bytes=20_000, keep_s=3600)
    assert again.already_ran("r399") and again.already_ran("r0")
    again.close()
