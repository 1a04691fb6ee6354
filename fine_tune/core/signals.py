"""Stop requests: SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 (what Slurm, submitit and
torchrun send before a time limit or a preemption) ask the run to checkpoint and exit.

The handlers are installed by the entry point before anything heavy is imported, so a
signal that arrives while torch and the data load is remembered instead of killing the
process. The loop acts on it at the next optimizer-step boundary (or in the middle of an
evaluation); a Ctrl-C after any stop request aborts at once.
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
EXIT_ABORTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class StopSignal:
    """Remembers the first stop request and says so, in one line, when it arrives."""

    def __init__(self):
        self.signum = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopSignal":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                os._exit(EXIT_ABORTED)
            return
        self.signum = signum
        world = int(os.environ.get("WORLD_SIZE", "1"))
        who = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        # os.write, not print: a handler may interrupt a print in progress (reentrant call)
        os.write(2, f"{who}stop requested ({signal.Signals(signum).name}): checkpointing after this step; "
                    "Ctrl-C again aborts\n".encode())


_installed: StopSignal | None = None


def install_stop_handlers() -> StopSignal:
    """The process's StopSignal, installed on the first call (the same one afterwards)."""
    global _installed
    if _installed is None:
        _installed = StopSignal().install()
    return _installed
