"""The score of the last ``mutmut run`` (``make mutation``), its survivors, and the floor.

    python -m tests.support.mutation_score [--floor 85]

Reads mutmut's results (``mutmut export-cicd-stats``, ``mutmut results``), prints the killed
share of the mutants that tests reach and every surviving mutant, and exits 1 under the
floor. Timeouts count as killed (the mutant made a test hang, the test run failed); mutants no
test reaches count as survivors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STATS = Path("mutants/mutmut-cicd-stats.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.mutation_score")
    parser.add_argument("--floor", type=float, default=85.0, help="killed share, percent")
    args = parser.parse_args(argv)
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    subprocess.run([mutmut, "export-cicd-stats"], check=True, capture_output=True)
    stats = json.loads(STATS.read_text())
    killed = stats["killed"] + stats["timeout"]
    survived = stats["survived"] + stats["no_tests"] + stats["suspicious"]
    judged = killed + survived
    score = 100.0 * killed / judged if judged else 0.0
    results = subprocess.run([mutmut, "results"], check=True, capture_output=True, text=True)
    survivors = [line.strip() for line in results.stdout.splitlines() if line.strip()]
    print(
        f"mutants: {stats['total']}  killed: {killed}  survived: {survived}  "
        f"skipped: {stats['skipped']}  score: {score:.1f} % (floor {args.floor:g} %)"
    )
    for line in survivors:
        print(f"  {line}")
    return 0 if score >= args.floor else 1


if __name__ == "__main__":
    sys.exit(main())
