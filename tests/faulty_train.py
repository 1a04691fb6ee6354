"""train.py with a fault staged while the data loads, for the tests of failing processes.

    FINE_TUNE_TEST_DATA_FAULT=1:raise accelerate launch ... tests/faulty_train.py ARGS
    FINE_TUNE_TEST_DATA_FAULT=0:hang  python tests/faulty_train.py ARGS

"RANK:raise" makes that process fail, "RANK:hang" makes it stop answering, as it loads the
data (a failure on one node, such as a full or missing disk, cannot be staged otherwise). The
fault wraps ``fine_tune.core.data.load_raw_splits`` from here; the training code knows nothing
of it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

DATA_FAULT_ENV = "FINE_TUNE_TEST_DATA_FAULT"
SCRIPT = Path(__file__).resolve()


def injected_data_fault() -> None:
    """The fault DATA_FAULT_ENV asks of this process, if any."""
    rank, _, kind = os.environ.get(DATA_FAULT_ENV, "").partition(":")
    if rank and rank == os.environ.get("RANK", "0"):
        if kind == "hang":
            time.sleep(3600)
        raise OSError(f"{DATA_FAULT_ENV}: simulated failure of process {rank} at unix time {time.time():.3f} "
                      "while loading the data")


def main() -> None:
    sys.path.insert(0, str(SCRIPT.parents[1]))
    from fine_tune.core.signals import install_stop_handlers

    install_stop_handlers()  # first, as train.py does
    from fine_tune.core import data

    load_raw_splits = data.load_raw_splits

    def faulty_load_raw_splits(cfg):
        injected_data_fault()
        return load_raw_splits(cfg)

    data.load_raw_splits = faulty_load_raw_splits
    from fine_tune.__main__ import train_main

    train_main(sys.argv[1:], prog="train.py")


if __name__ == "__main__":
    main()
