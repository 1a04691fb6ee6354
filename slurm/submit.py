#!/usr/bin/env python
"""Submit train.py to Slurm: `python slurm/submit.py [options] -- [train.py flags]`.

The logic lives in fine_tune/slurm.py (also reachable as `python -m fine_tune.slurm`);
`python slurm/submit.py --help` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fine_tune.slurm import main  # noqa: E402

if __name__ == "__main__":
    main()
