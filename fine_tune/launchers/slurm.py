"""Run train.py on Slurm (or on this machine) through submitit: multi-node jobs, sweeps as job
arrays, hyper-parameter searches, preemption that checkpoints, requeues and resumes.

    fine-tune submit [options] -- [train.py flags]        (or: python slurm/submit.py ...)

The launcher in four parts: job (what every node runs: one ``accelerate launch`` per node,
preemption and requeue), sweeps (sweep files into points), submission (the command line,
the executor, the dry run) and follow (logs, states, the sweep's table); a search
(``--search``) runs through fine_tune.launchers.search. This module is the entry point.
"""

from __future__ import annotations

import sys
from typing import Optional

from fine_tune.core.config import main_guard
from fine_tune.launchers.follow import follow
from fine_tune.launchers.job import PREFIX
from fine_tune.launchers.search import run_search
from fine_tune.launchers.submission import build_parser, describe, dry_run_text, parse_submission, split_argv, submit


@main_guard
def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return
    sub = parse_submission(argv, stamp="dry_run" if "--dry_run" in split_argv(argv)[0] else None)
    if sub.search is not None:
        sys.exit(run_search(sub))
    if sub.opts.dry_run:
        sys.stdout.write(dry_run_text(sub))
        return
    jobs = submit(sub)
    print(describe(sub, jobs), flush=True)
    if not sub.opts.wait:
        return
    try:
        status = follow(sub, jobs)
    except KeyboardInterrupt:
        print(f"\n{PREFIX} stopped following; the job keeps running", file=sys.stderr)
        sys.exit(130)
    sys.exit(status)


if __name__ == "__main__":
    main()
