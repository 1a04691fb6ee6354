"""The output folder: one run per folder, nothing finished is wiped by accident, results
written atomically, and every node sees the same folder.

* :class:`OutputLock`: an ``fcntl.flock`` on ``OUTPUT_DIR/.lock`` held by the main process
  for the run's life; the file names the holder (host and pid), so a second run into the same
  folder fails at once saying who holds it. The kernel drops the lock when its process dies,
  so a lock left by a killed run is taken over (and the takeover is reported).
* :func:`check_output_dir`: a fresh start (no checkpoint to resume, ``latest`` included) into a
  folder holding a finished run (``final/`` or ``eval_results.json``), or a resume from another
  folder's checkpoint into a folder holding a run, needs ``--overwrite_output_dir``.
* :func:`write_atomic` and :func:`replace_folder`: ``eval_results.json`` and ``final/`` are
  written beside their old versions and renamed over them only when complete.
* :func:`check_shared_folder`: rank 0 writes a token, every rank must see it; a folder that is
  not on a filesystem all nodes share is reported before any work.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Optional

from fine_tune.core.errors import UserError

LOCK_FILE = ".lock"
FINISHED_MARKERS = ("final", "eval_results.json")  # a finished run's results
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints") + FINISHED_MARKERS
CRASH_IN_FINAL_ENV = "FINE_TUNE_TEST_KILL_IN_FINAL_SAVE"  # tests: =1 kills the process before final/ is swapped


# ------------------------------------------------------------------ atomic writes
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def write_atomic(path: Path, text: str) -> None:
    """Write a file beside the old one and rename it over: readers see the old or the new
    content, never a part; a failed write (disk full, a kill) leaves the old file as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_folder(target: Path, build: Callable[[Path], None]) -> None:
    """Build a folder in ``.tmp-<name>`` with ``build(tmp)``, then put it in place of ``target``.

    The old folder stays untouched until the new one is complete and on disk; the swap is two
    renames (``target`` to ``.old-<name>``, the new one to ``target``), and
    :func:`recover_folder` restores the old one should a kill fall between them."""
    target = Path(target)
    tmp, old = target.with_name(f".tmp-{target.name}"), target.with_name(f".old-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    fsync_tree(tmp)
    if os.environ.get(CRASH_IN_FINAL_ENV) == "1":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)  # tests: a kill after the write, before the swap
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: Path) -> None:
    """Undo what a kill between the two renames of :func:`replace_folder` left, and drop an
    unfinished new folder."""
    target = Path(target)
    old = target.with_name(f".old-{target.name}")
    if old.exists() and not target.exists():
        os.rename(old, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(target.with_name(f".tmp-{target.name}"), ignore_errors=True)


# ------------------------------------------------------------------ one run per folder
class OutputLock:
    """``fcntl.flock`` on ``OUTPUT_DIR/.lock``, held until :meth:`release` or the process ends."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        # the folders made for the lock alone: a start that fails before writing anything else
        # removes them again (release), so bad input leaves no trace
        self.created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_RDWR without O_TRUNC: the holder's name must survive until we own the lock
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.previous_holder = ""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read() or "unknown holder"
            os.close(self._fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{output_dir} is in use by another run ({holder}); wait for it to end, stop it, "
                                "or choose another --output_dir") from None
            raise UserError(f"cannot lock {self.path} ({e.strerror}): the filesystem does not support flock; "
                            "use an output folder on a filesystem that does (on Lustre: mount with -o flock)") from None
        self.previous_holder = self._read()  # non-empty: its process ended without releasing the lock
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        os.fsync(self._fd)

    def _read(self) -> str:
        try:
            return os.pread(self._fd, 4096, 0).decode(errors="replace").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: released cleanly (the file itself stays)
        if not any(p.name != LOCK_FILE for p in self.path.parent.iterdir()):
            self.path.unlink(missing_ok=True)  # nothing else was written (a failed start): no trace left
            for folder in self.created:  # innermost first
                try:
                    folder.rmdir()
                except OSError:
                    break
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


# ------------------------------------------------------------------ occupied folders
def holds_finished_run(out: Path) -> bool:
    return any((Path(out) / name).exists() for name in FINISHED_MARKERS)


def holds_run(out: Path) -> bool:
    return any((Path(out) / name).exists() for name in RUN_MARKERS)


def is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_output_dir(cfg, resume_path: Optional[Path]) -> None:
    """Refuse to write over another run's results (checked before any work, changes nothing)."""
    if cfg.overwrite_output_dir:
        return
    out = Path(cfg.output_dir)
    if resume_path is None:
        if cfg.resume_from_checkpoint == "latest" and holds_finished_run(out):
            raise UserError(f"{out} holds a finished run (final/, eval_results.json) but no checkpoint to resume; "
                            "starting again would replace its results: pass --overwrite_output_dir to do that, "
                            "or choose another --output_dir")
        if cfg.resume_from_checkpoint != "latest" and holds_run(out):
            raise UserError(f"{out} already holds a run; pass --overwrite_output_dir to replace it, "
                            "--resume_from_checkpoint latest to continue it, or choose another --output_dir")
    elif not is_inside(resume_path, out) and holds_run(out):
        raise UserError(f"{out} holds another run, and the checkpoint {resume_path} is not one of its own; resuming "
                        "would replace its metrics and results: pass --overwrite_output_dir to do that, or choose "
                        "another --output_dir")


def clear_output_dir(out: Path) -> None:
    """What a fresh start replaces (only after --overwrite_output_dir, or an unfinished run's
    leftovers when ``latest`` found nothing to resume)."""
    out = Path(out)
    for name in ("checkpoints", "final", "tensorboard"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "eval_results.json", "config.yaml"):
        (out / name).unlink(missing_ok=True)


# ------------------------------------------------------------------ decided once, on rank 0
def on_main(accelerator, fn: Callable[[], object], share: bool = True):
    """Run ``fn`` on the main process only; every rank gets its result (``share``) or its error,
    so that a refusal on rank 0 ends all ranks at once instead of leaving them at a barrier."""
    result, error, raised = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, then raised here
            raised = e
            error = str(e) if isinstance(e, UserError) else f"rank 0 failed: {type(e).__name__}: {e}"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [result if share else None, error]
        broadcast_object_list(box, from_process=0)
        if not accelerator.is_main_process:
            result, error = box
    if raised is not None:
        raise raised
    if error is not None:
        raise UserError(error)
    return result


def claim_output_dir(accelerator, cfg) -> Optional[OutputLock]:
    """Lock the output folder (main process) and check that every rank sees it; the lock is
    returned to be held for the run's life."""
    lock = None

    def take():
        nonlocal lock
        lock = OutputLock(cfg.output_dir)
        if lock.previous_holder:
            print(f"output folder lock: the run that held it ({lock.previous_holder}) ended without releasing it; "
                  "taking it over", flush=True)

    on_main(accelerator, take, share=False)
    check_shared_folder(accelerator, Path(cfg.output_dir))
    return lock


# ------------------------------------------------------------------ shared filesystem
def check_shared_folder(accelerator, out: Path) -> None:
    """Every rank must see what rank 0 writes into the output folder: checkpoints, ``latest``
    and the resume choice live there. Nodes with a local folder each would resume from
    different steps and deadlock later; this says so before any work."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    token = [None]
    if accelerator.is_main_process:
        token[0] = f".shared-check-{secrets.token_hex(8)}"
        (Path(out) / token[0]).write_text("written by rank 0; every rank must see it\n")
    broadcast_object_list(token, from_process=0)
    seen = gather_object([(accelerator.process_index, socket.gethostname(), (Path(out) / token[0]).exists())])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (Path(out) / token[0]).unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, host, ok in seen if not ok]
    if blind:
        raise UserError(f"--output_dir {out} is not shared by every node ({', '.join(blind)} cannot see what rank 0 "
                        f"on {seen[0][1]} wrote there): the output folder must be on a filesystem all nodes share")
