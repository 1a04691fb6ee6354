"""Reading run folders: what the loop writes into an ``OUTPUT_DIR`` (``config.yaml``,
``metrics.jsonl``, ``eval_results.json``), as one :class:`Run` per folder.

The reader lives beside the writer (outputs, tracking) so that a change to a run folder's
files changes both in one place; ``fine-tune compare``, the Slurm sweep's table and the
search report all read runs through it.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from fine_tune.core.errors import UserError
from fine_tune.core.tables import is_number


@dataclass
class Run:
    """One training run, read from its output folder (or from W&B)."""
    name: str
    path: str
    config: dict
    records: list = field(default_factory=list)  # metrics.jsonl events: {"step": n, metric: value, ...}
    results: dict = field(default_factory=dict)  # eval_results.json (written when the run finished)
    wall_time: Optional[float] = None  # seconds, where known from elsewhere (W&B runtime)
    finished: bool = True

    def series(self, metric: str) -> list[tuple[int, float]]:
        """(optimizer step, value) of every event that logged ``metric``; a step logged
        twice (events re-logged after a resume) keeps its last value."""
        points = {}
        for r in self.records:
            value = r.get(metric)
            if is_number(value) and "step" in r:
                points[int(r["step"])] = float(value)
        return sorted(points.items())

    def steps(self) -> Optional[int]:
        steps = [int(r["step"]) for r in self.records if "step" in r]
        if self.results.get("global_step") is not None:
            steps.append(int(self.results["global_step"]))
        return max(steps) if steps else None

    def elapsed(self) -> Optional[float]:
        if self.wall_time is not None:
            return self.wall_time
        times = [r["elapsed_s"] for r in self.records if is_number(r.get("elapsed_s"))]
        if times:
            return max(times)
        folder = Path(self.path)  # runs logged before elapsed_s existed: file times
        end = [p.stat().st_mtime for p in (folder / "eval_results.json", folder / "metrics.jsonl") if p.exists()]
        start = folder / "config.yaml"
        if end and start.exists():
            return max(0.0, max(end) - start.stat().st_mtime)
        return None

    def samples_per_second(self) -> Optional[float]:
        values = [r["samples_per_second"] for r in self.records if is_number(r.get("samples_per_second"))]
        return sum(values) / len(values) if values else None


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file()
                                                 or (path / "eval_results.json").is_file())


def find_run_dirs(patterns: Iterable[str]) -> list[Path]:
    """Run folders named by the arguments: run folders, folders holding runs, globs."""
    found: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        if not matches or not any(Path(m).exists() for m in matches):
            raise UserError(f"{pattern}: no such run folder (give OUTPUT_DIR folders of train.py, or a glob)")
        for m in map(Path, matches):
            if is_run_dir(m):
                found.append(m)
            elif m.is_dir():
                inner = sorted(p.parent for p in m.rglob("config.yaml")
                               if "checkpoints" not in p.relative_to(m).parts and is_run_dir(p.parent))
                if not inner and not glob.has_magic(expanded):
                    raise UserError(f"{m} holds no run (a run folder has config.yaml and metrics.jsonl); "
                                    "give OUTPUT_DIR folders of train.py")
                found.extend(inner)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UserError(f"no run folders in {' '.join(patterns)}")
    return unique


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(record, dict):
                records.append(record)
    return records


def load_run(path: str | os.PathLike, name: Optional[str] = None) -> Run:
    import yaml

    folder = Path(path)
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{folder}: cannot read config.yaml ({e})") from None
    results = {}
    if (folder / "eval_results.json").exists():
        try:
            results = json.loads((folder / "eval_results.json").read_text())
        except json.JSONDecodeError:
            results = {}
    return Run(name=name or config.get("run_name") or folder.name, path=str(folder), config=config,
               records=_read_jsonl(folder / "metrics.jsonl"), results=results,
               finished=bool(results))


def load_runs(run_dirs: Iterable[str | os.PathLike]) -> list[Run]:
    """Load run folders (or folders of runs, or globs), each named uniquely."""
    dirs = find_run_dirs([str(d) for d in run_dirs])
    runs = [load_run(d) for d in dirs]
    _unique_names(runs, dirs)
    return runs


def _unique_names(runs: list[Run], dirs: list[Path]) -> None:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return
    root = Path(os.path.commonpath([str(d) for d in dirs])) if len(dirs) > 1 else dirs[0].parent
    for run, d in zip(runs, dirs):
        run.name = str(d.relative_to(root)) if d != root else d.name
