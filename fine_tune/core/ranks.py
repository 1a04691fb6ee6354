"""Several processes fail together: a failure on one ends all of them promptly, with its error.

A process that fails while the others wait for it (at a barrier, in an all-reduce) would
leave them waiting until the process-group timeout. So the stages where any process may
fail on its own (loading and tokenizing the data) end with an exchange of each process's
outcome: the failing process raises its own error, every other one an error naming that
process and its message. Anything else is bounded by ``--ddp_timeout``, the timeout of
every collective (and under ``accelerate launch``/``torchrun`` the launcher ends the other
processes when one exits with an error).
"""

from __future__ import annotations

from datetime import timedelta

from fine_tune.core.errors import UserError, first_line


class PeerFailed(UserError):
    """Another process failed; its error is in the message (and in that process's output)."""


def process_group_kwargs(cfg, backend: str | None):
    """accelerate's handler that sets the process group's backend and --ddp_timeout."""
    from accelerate.utils import InitProcessGroupKwargs

    kwargs = {"timeout": timedelta(seconds=cfg.ddp_timeout)}
    if backend:
        kwargs["backend"] = backend
    return InitProcessGroupKwargs(**kwargs)


def one_line(error: BaseException) -> str:
    """An error as one line, with its type unless it is a user error (those explain themselves)."""
    return first_line(error) if isinstance(error, UserError) else f"{type(error).__name__}: {first_line(error)}"


def raise_if_any_failed(accelerator, error: BaseException | None, stage: str) -> None:
    """Called by every process after ``stage``, with the error it caught there (or None)."""
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        outcomes = [None] * accelerator.num_processes
        try:
            dist.all_gather_object(outcomes, None if error is None else one_line(error))
        except Exception as e:  # noqa: BLE001 - a process died, or did not come within the timeout
            raise (error or peer_lost(accelerator, e, stage)) from None
        failed = [(rank, line) for rank, line in enumerate(outcomes) if line is not None]
        if error is None and failed:
            rank, line = failed[0]
            raise PeerFailed(f"process {rank} failed {stage}: {line}")
    if error is not None:
        raise error


def computed_on_main(accelerator, compute, stage: str):
    """``compute()`` on the main process only; its result reaches every process (a broadcast),
    and so does its failure: the main process raises its own error, the others one naming it."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = compute()
        except Exception as e:  # noqa: BLE001 - every process must learn of it
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [result, None if error is None else one_line(error)]
        try:
            broadcast_object_list(box, from_process=0)
        except Exception as e:  # noqa: BLE001 - a process died, or did not come within the timeout
            raise (error or peer_lost(accelerator, e, stage)) from None
        if error is None and box[1] is not None:
            raise PeerFailed(f"process 0 failed {stage}: {box[1]}")
        result = box[0]
    if error is not None:
        raise error
    return result


def peer_lost(accelerator, error: BaseException, stage: str) -> PeerFailed:
    """The error of a collective that failed because another process died or did not come."""
    return PeerFailed(f"another process failed or did not answer {stage} within --ddp_timeout "
                      f"{accelerator_timeout(accelerator)} s ({one_line(error)})")


def accelerator_timeout(accelerator) -> int | str:
    handler = getattr(accelerator, "init_handler", None)
    timeout = getattr(handler, "timeout", None)
    return int(timeout.total_seconds()) if timeout else "?"
