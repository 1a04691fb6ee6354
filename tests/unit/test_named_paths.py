"""A moved or renamed module fails here, not in a user's hands: every module, command and script
that the README, the docs, the recipes, the Makefile and the scripts (bench/, slurm/, the
repository's own *.py and *.sh) name must exist, import, and answer ``--help``.

Named things are found by pattern, not listed, so a new doc or script is checked as soon as it
exists: ``fine_tune.x.y`` (and ``fine_tune.x:attribute``) module paths, ``fine-tune X`` and
``python -m fine_tune X`` commands, and repository paths of scripts (``bench/x.py``,
``slurm/x.sh``). In markdown only code (fenced blocks and `inline` spans) counts. Modules
are imported and commands and Python scripts run ``--help`` in this process (fast); shell
scripts are parsed with ``bash -n``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
MODULE = re.compile(r"(?<![\w/.-])fine_tune(?:\.\w+)+(?::\w+)?")
# `fine-tune X` where it is a command line (line start, `$ `, .venv/bin/, a code span, "Data: ..."),
# not prose such as "prepare the data, fine-tune on CPU"
COMMAND = re.compile(r"(?:(?:^|\$)[ \t]*|[`(/]|:[ \t]+)fine-tune[ \t]+([a-z][\w-]*)|-m[ \t]+fine_tune[ \t]+([a-z][\w-]*)",
                     re.M)
SCRIPT = re.compile(r"(?<![\w/.$-])((?:[\w-]+/)+[\w-]+\.(?:py|sh|sbatch))\b")
TOP_FOLDERS = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}


def sources(root: Path = ROOT) -> list[Path]:
    """Where the project names its modules, commands and scripts."""
    files = [root / "README.md", root / "Makefile", *sorted((root / "docs").glob("*.md")),
             *sorted((root / "recipes").rglob("*.yaml")), *sorted(root.glob("*.py")), *sorted(root.glob("*.sh"))]
    for folder in ("bench", "slurm"):
        files += sorted(p for p in (root / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return [f for f in files if f.is_file()]


def code_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".md":
        return text
    return "\n".join(FENCE.findall(text) + INLINE.findall(FENCE.sub("", text)))


def named(paths) -> dict[str, dict[str, set[str]]]:
    """kind ("module", "command", "script") -> name -> the files that name it."""
    found: dict[str, dict[str, set[str]]] = {"module": {}, "command": {}, "script": {}}
    for path in paths:
        text = code_text(Path(path))
        where = str(Path(path).relative_to(ROOT)) if Path(path).is_relative_to(ROOT) else Path(path).name
        for name in MODULE.findall(text):
            found["module"].setdefault(name, set()).add(where)
        for match in COMMAND.finditer(text):
            found["command"].setdefault(match.group(1) or match.group(2), set()).add(where)
        for name in SCRIPT.findall(text):
            if name.split("/")[0] in TOP_FOLDERS:  # a path of this repository (not runs/..., a/b.py)
                found["script"].setdefault(name, set()).add(where)
    return found


def resolve(name: str):
    """Import a dotted path (``a.b.c`` or ``a.b:c``): the longest module prefix, then attributes."""
    parts = name.replace(":", ".").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:cut]).startswith(e.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the doc names something the module lacks
        return obj
    raise ModuleNotFoundError(name)


@contextlib.contextmanager
def same_signals():
    """train.py installs stop handlers; this process keeps its own."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def help_text(run) -> str:
    """stdout of ``run()``, which must print help and end (return or exit 0)."""
    out = io.StringIO()
    with same_signals(), contextlib.redirect_stdout(out):
        try:
            run()
        except SystemExit as e:
            assert e.code in (0, None), f"--help exited with {e.code}"
    return out.getvalue()


NAMED = named(sources())
SCRIPT_FOLDERS = ("bench", "slurm")  # and the repository's top level: where the scripts a user runs live


def scripts(suffixes: tuple[str, ...]) -> list[str]:
    """The scripts (found, and named by a source) with these suffixes."""
    found = {p for p in ROOT.iterdir() if p.is_file()}
    for folder in SCRIPT_FOLDERS:
        found |= set((ROOT / folder).rglob("*"))
    names = {str(p.relative_to(ROOT)) for p in found if p.suffix in suffixes}
    return sorted(names | {s for s in NAMED["script"] if s.endswith(suffixes) and s.split("/")[0] in SCRIPT_FOLDERS})


PY_SCRIPTS = scripts((".py",))
SHELL_SCRIPTS = scripts((".sh", ".sbatch"))


def test_the_sources_name_what_this_test_checks():
    assert {"prepare-data", "compare", "submit"} <= set(NAMED["command"])
    assert "slurm/submit.py" in NAMED["script"] and "fine_tune.launchers.search:trial_reporter" in NAMED["module"]


@pytest.mark.parametrize("name", sorted(NAMED["module"]))
def test_every_named_module_imports(name):
    try:
        found = resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{name} (named in {', '.join(sorted(NAMED['module'][name]))}): {e}")
    assert found is not None, name


@pytest.mark.parametrize("name", sorted(NAMED["command"]))
def test_every_named_command_exists_and_answers_help(name):
    from fine_tune.__main__ import COMMANDS, main

    assert name in COMMANDS, f"fine-tune {name} (named in {', '.join(sorted(NAMED['command'][name]))}) is no command"
    text = help_text(lambda: main([name, "--help"]))
    assert text.startswith(f"usage: fine-tune {name} "), text[:200]


@pytest.mark.parametrize("path", sorted(NAMED["script"]))
def test_every_named_repository_path_exists(path):
    assert (ROOT / path).is_file(), f"{path} (named in {', '.join(sorted(NAMED['script'][path]))}) does not exist"


@pytest.mark.parametrize("script", PY_SCRIPTS)
def test_every_python_script_answers_help(script, monkeypatch):
    path = ROOT / script
    assert path.is_file(), f"{script} (named in {', '.join(sorted(NAMED['script'].get(script, ())))}) does not exist"
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    text = help_text(lambda: runpy.run_path(str(path), run_name="__main__"))
    assert "usage:" in text and "--help" in text, text[:200]


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_every_shell_script_parses(script):
    path = ROOT / script
    assert path.is_file(), f"{script} (named in {', '.join(sorted(NAMED['script'].get(script, ())))}) does not exist"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_doc_that_names_a_moved_module_command_or_script_is_caught(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("Run `python -m fine_tune.compare runs/*` or `fine-tune explain`; it imports\n"
                   "`fine_tune.core.loop` and `fine_tune.launchers.search:no_such_hook`.\n\n"
                   "```bash\npython bench/gone.py --help\n.venv/bin/fine-tune compare runs/a   # fine-tune on CPU\n```\n"
                   "To fine-tune a model, see `fine_tune/core/loop.py`.\n")
    found = named([doc])
    assert set(found["command"]) == {"explain", "compare"}
    assert set(found["script"]) == {"bench/gone.py", "fine_tune/core/loop.py"}
    assert set(found["module"]) == {"fine_tune.compare", "fine_tune.core.loop", "fine_tune.launchers.search:no_such_hook"}
    resolve("fine_tune.core.loop")
    with pytest.raises(AttributeError):
        resolve("fine_tune.compare")  # the alias module is gone: fine_tune has no attribute compare
    with pytest.raises(AttributeError):
        resolve("fine_tune.launchers.search:no_such_hook")
    from fine_tune.__main__ import COMMANDS

    assert "explain" not in COMMANDS and not (ROOT / "bench" / "gone.py").exists()
