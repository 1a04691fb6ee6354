"""The docs cannot drift from the code: every flag written in README.md and docs/*.md is an
option of one of the project's parsers (or of another tool, listed below), and every relative
link points to a file (and, with a #fragment, to a heading of it). In-process, no training."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Flags of other programs that the docs show in commands and their output. Only these: a
# misspelt accelerate or sbatch flag in the docs should fail here too.
OTHER_TOOLS = {
    "accelerate launch": {"--config_file", "--num_processes", "--num_machines", "--machine_rank",
                          "--main_process_port", "--rdzv_backend", "--same_network",
                          "--deepspeed_multinode_launcher", "--deepspeed_config_file"},
    "sbatch, srun, scancel": {"--gpus-per-node", "--job-name", "--ntasks-per-node", "--open-mode", "--requeue",
                              "--signal", "--wckey", "--unbuffered", "--kill-on-bad-exit", "--batch"},
    "pytest": {"--durations", "--dist"},  # --dist: pytest-xdist
    "pip": {"--index-url"},
    "tensorboard": {"--logdir"},
    # not a tool: the misspelling whose error message the docs show
    "deliberate typo": {"--learnig_rate"},
}

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def project_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command-line parser of the project, by the command it belongs to."""
    from fine_tune.commands import bench, compare, explore, export, predict, prepare_data
    from fine_tune.core.config import build_parser as train_parser
    from fine_tune.launchers import submission

    # bench/ holds scripts, not a package: load the ones with flags from their files
    def script(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    memory, proof = script("large_models_memory"), script("gpu_proof")
    return {"train.py": train_parser(), "prepare-data": prepare_data.build_parser(),
            "explore": explore.build_parser(), "predict": predict.build_parser(), "export": export.build_parser(),
            "compare": compare.build_parser(), "bench": bench.build_parser(), "submit": submission.build_parser(),
            "bench/large_models_memory.py": memory.build_parser(), "bench/gpu_proof.py": proof.build_parser()}


def known_flags() -> set[str]:
    # argparse has no public list of a parser's options; _actions is what its own help uses
    ours = {opt for parser in project_parsers().values() for action in parser._actions
            for opt in action.option_strings}
    return ours.union(*OTHER_TOOLS.values())


def where(path: Path) -> str:
    """The path as the repository names it (docs/slurm.md), or its bare name outside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def unknown_flags(paths, known: set[str]) -> dict[str, list[str]]:
    """Flag -> the places (file:line) that write it, for each flag not in ``known``."""
    found: dict[str, list[str]] = {}
    for path in paths:
        for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            for flag in FLAG.findall(line):
                if flag not in known:
                    found.setdefault(flag, []).append(f"{where(Path(path))}:{lineno}")
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def broken_links(paths) -> list[str]:
    """'file:line: target (why)' for each relative link that points nowhere."""
    broken = []
    for path in map(Path, paths):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # https:, mailto: ...
                    continue
                file_part, _, fragment = target.partition("#")
                dest = (path.parent / file_part) if file_part else path
                if not dest.exists():
                    broken.append(f"{where(path)}:{lineno}: {target} (no such file)")
                elif fragment and dest.suffix == ".md" and fragment not in {
                        slug(h) for h in HEADING.findall(dest.read_text(encoding="utf-8"))}:
                    broken.append(f"{where(path)}:{lineno}: {target} (no such heading)")
    return broken


def test_every_flag_in_the_docs_exists():
    unknown = unknown_flags(DOCS, known_flags())
    assert not unknown, "flags in the docs that no parser of the project (nor OTHER_TOOLS) knows:\n" + "\n".join(
        f"  {flag}: {', '.join(places)}" for flag, places in sorted(unknown.items()))


def test_every_relative_link_points_to_a_file():
    broken = broken_links(DOCS)
    assert not broken, "broken links:\n" + "\n".join(f"  {b}" for b in broken)


def test_the_checks_catch_a_wrong_flag_and_a_dead_link(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The default data\n")
    doc = tmp_path / "page.md"
    doc.write_text(
        "accelerate launch --config_file a.yaml train.py --learning_rate 1e-4 --lerning_rate 2\n"
        "fine-tune submit --nodes 2 --gpus_per_nodes 8 -- --config recipes/sentiment.yaml\n"
        "fine-tune compare runs/* --sort_by eval_loss; table rule |---|---:| and a bare -- separator\n"
        "[fine](other.md) [anchor](other.md#the-default-data) [web](https://example.org/x.md)\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-part)\n")
    known = known_flags()
    assert {"--learning_rate", "--nodes", "--sort_by", "--text", "--only", "--modes"} <= known
    assert unknown_flags([doc], known) == {"--lerning_rate": ["page.md:1"], "--gpus_per_nodes": ["page.md:2"]}
    assert broken_links([doc]) == ["page.md:5: missing.md (no such file)",
                                   "page.md:5: other.md#no-such-part (no such heading)"]
