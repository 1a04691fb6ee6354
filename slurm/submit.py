#!/usr/bin/env python
"""Submit train.py to Slurm: `python slurm/submit.py [options] -- [train.py flags]`, the same
command as `fine-tune submit` (its entry point is fine_tune/launchers/slurm.py).

`fine-tune submit --help` lists the options. Needs the package installed (`make setup`).
"""

from fine_tune.launchers.slurm import main

if __name__ == "__main__":
    main()
