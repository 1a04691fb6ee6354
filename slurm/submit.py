#!/usr/bin/env python
"""Submit train.py to Slurm: `python slurm/submit.py [options] -- [train.py flags]`.

The launcher lives in fine_tune/launchers/slurm.py (also `fine-tune submit`, `python -m fine_tune.slurm`);
`python slurm/submit.py --help` lists the options. Needs the package installed (`make setup`).
"""

from fine_tune.launchers.slurm import main

if __name__ == "__main__":
    main()
