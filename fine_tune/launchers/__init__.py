"""Launchers that start train.py on a cluster: slurm (submitit jobs, arrays, requeue)."""
