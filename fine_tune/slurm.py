"""`python -m fine_tune.slurm`: the launcher lives in fine_tune/launchers/slurm.py."""

from fine_tune.launchers.slurm import main

if __name__ == "__main__":
    main()
