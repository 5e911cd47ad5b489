"""A flow for the command executor in tests: it runs until the file named by the input
``release_file`` exists, then succeeds. Lets a test decide when a running run finishes."""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    inputs = json.load(sys.stdin)["inputs"]  # the run, as the command executor sends it
    path = inputs.get("release_file")
    while path and not os.path.exists(path):
        time.sleep(0.05)
    print(json.dumps({"released": bool(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
