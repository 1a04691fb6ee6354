"""The loop's one extension point: a function called after each evaluation that may stop the run.

``--eval_hook MODULE:FACTORY`` names it. The core imports it by that name and knows nothing of
who wrote it (the search launcher's trial reporter, fine_tune.launchers.search, is one), so
the dependency runs from the launchers to the core, never back.

    factory(config: TrainConfig) -> hook
    hook(step: int, evaluation: int, metrics: dict) -> bool   # true: stop the run ("pruned")

The loop builds the hook on the main process only; ``evaluation`` counts evaluations from 1
(the same number after a resume), ``metrics`` holds the ``eval_*`` values of that evaluation.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

from fine_tune.core.errors import UserError


def load_eval_hook(spec: Optional[str]) -> Optional[Callable]:
    """The factory named by ``--eval_hook`` (imported on every rank, so that a bad name fails
    everywhere alike, before any work)."""
    if not spec:
        return None
    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--eval_hook {spec}: cannot import it ({e})") from None
    if not callable(factory):
        raise UserError(f"--eval_hook {spec}: not a callable")
    return factory
