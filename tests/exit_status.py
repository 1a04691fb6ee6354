"""Run train.py inside this process and write its exit status to $EXIT_STATUS_DIR/rank_$RANK.

For tests only: `accelerate launch` (torchrun) reports 1 for any failing rank, and nothing at
all for ranks it stopped on a signal, so a test launches this instead of train.py to learn
each rank's own status. Signals reach train.py's code exactly as they would (same process)."""

import os
import runpy
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "train.py"

if __name__ == "__main__":
    status = 1  # an exception that escapes train.py
    try:
        sys.path.insert(0, str(TRAIN.parent))  # as `python train.py` would: this checkout's package
        sys.argv = [str(TRAIN), *sys.argv[1:]]
        runpy.run_path(str(TRAIN), run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        Path(os.environ["EXIT_STATUS_DIR"], f"rank_{os.environ.get('RANK', '0')}").write_text(str(status))
