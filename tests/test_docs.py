"""The commands written in README.md and docs/**/*.md name options that exist, so the docs cannot rot.

Authorities: for `python -m steps.<name> --option` (and `torchrun ... -m steps.<name>`), the click
command in steps/<name>.py (its `.params`, generated from the config dataclasses); for `-P <name>=`,
the entry point's `parameters:` in MLproject, which is what `mlflow run` checks `-P` against. The
entry point is the `-e <name>` of the same `mlflow run` command (`main` without one), or the entry
point named just before `-P` in prose (`finetune -P pretrained=`); a `-P` with neither must be a
parameter of some entry point.
"""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


class Line(str):
    """A logical line (backslash continuations joined) that knows each character's line number."""

    starts: list[tuple[int, int]]  # (offset in the text, line number in the file), one per physical line

    def number_at(self, offset: int) -> int:
        return [number for start, number in self.starts if start <= offset][-1]


def logical_lines(path: Path) -> list[Line]:
    """The file's lines, with backslash-continued lines joined into one."""
    out, parts, starts, length = [], [], [], 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        starts.append((length, number))
        continued = raw.rstrip().endswith("\\")
        piece = raw.rstrip()[:-1] + " " if continued else raw
        parts.append(piece)
        length += len(piece)
        if not continued:
            line = Line("".join(parts))
            line.starts = starts
            out.append(line)
            parts, starts, length = [], [], 0
    if parts:
        line = Line("".join(parts))
        line.starts = starts
        out.append(line)
    return out


@functools.cache
def entry_points() -> dict[str, set[str]]:
    project = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    return {name: set(entry.get("parameters") or {}) for name, entry in project.items()}


@functools.cache
def step_options(step: str) -> set[str] | None:
    """Every flag of steps.<step>'s click command (with --help), or None when there is no such step."""
    try:
        command = importlib.import_module(f"steps.{step}").main
    except ModuleNotFoundError:
        return None
    assert isinstance(command, click.Command), f"steps.{step}.main is not a click command"
    params = command.get_params(click.Context(command))  # .params plus the --help click adds
    return {opt for p in params for opt in (*p.opts, *p.secondary_opts)}


# A placeholder such as `<prepare_data run id>` may hold `>`, which would otherwise end a command.
PLACEHOLDER = re.compile(r"<[^<>\n]*>")
STEP_COMMAND = re.compile(r"-m steps\.(\w+)")
COMMAND_END = re.compile(r"[`|>&;#]")  # a code span's end, a pipe, a redirect, a comment
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
PARAM = re.compile(r"-P (\w+)=")


def step_option_problems() -> tuple[list[str], int]:
    problems, checked = [], 0
    for path in doc_files():
        for line in logical_lines(path):
            for match in STEP_COMMAND.finditer(line):
                step = match.group(1)
                rest_at = match.end()
                rest = COMMAND_END.split(PLACEHOLDER.sub(lambda m: "X" * len(m.group()), line[rest_at:]), maxsplit=1)[0]
                where = f"{path.relative_to(ROOT)}:{line.number_at(match.start())}"
                options = step_options(step)
                if options is None:
                    problems.append(f"{where}: steps.{step} does not exist (python -m steps.{step})")
                    continue
                for found in FLAG.finditer(rest):
                    flag = found.group(1)
                    checked += 1
                    if flag not in options:
                        where = f"{path.relative_to(ROOT)}:{line.number_at(rest_at + found.start())}"
                        problems.append(f"{where}: {flag} is not an option of steps.{step} "
                                        f"(python -m steps.{step} --help lists them)")
    return problems, checked


def _entry_point_of(line: str, position: int) -> tuple[str | None, bool]:
    """The entry point a `-P` at `position` belongs to, and whether the line names one at all."""
    before = line[:position]
    runs = list(re.finditer(r"\bmlflow run\b", before))
    if runs and "`" not in before[runs[-1].start():]:  # the same command, not prose around another one
        command = before[runs[-1].start():]
        named = re.search(r"\s-e\s+(\w+)", command)
        return (named.group(1) if named else "main"), True
    word = re.search(r"(\w+)\s+$", before)
    if word and word.group(1) in entry_points():
        return word.group(1), True
    return None, False


def parameter_problems() -> tuple[list[str], int]:
    problems, checked = [], 0
    every = set().union(*entry_points().values())
    for path in doc_files():
        for line in logical_lines(path):
            for match in PARAM.finditer(line):
                name = match.group(1)
                entry, known = _entry_point_of(line, match.start())
                where = f"{path.relative_to(ROOT)}:{line.number_at(match.start())}"
                checked += 1
                if known and entry not in entry_points():
                    problems.append(f"{where}: MLproject has no entry point {entry!r} (-P {name}=)")
                elif known and name not in entry_points()[entry]:
                    problems.append(f"{where}: -P {name}= is not a parameter of entry point {entry!r} in MLproject")
                elif not known and name not in every:
                    problems.append(f"{where}: -P {name}= is a parameter of no entry point in MLproject")
    return problems, checked


def test_step_commands_use_existing_options():
    problems, checked = step_option_problems()
    assert not problems, "options the docs name that the steps do not have:\n" + "\n".join(problems)
    assert checked >= 50, f"only {checked} step options found in the docs: is the parser still reading them?"


def test_mlflow_run_parameters_exist_in_mlproject():
    problems, checked = parameter_problems()
    assert not problems, "-P parameters the docs name that MLproject does not have:\n" + "\n".join(problems)
    assert checked >= 50, f"only {checked} -P parameters found in the docs: is the parser still reading them?"


def test_readme_names_make_test():
    assert "make test" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("    python -m steps.tune --data X --n-trails 3", "--n-trails is not an option of steps.tune"),
        ("`python -m steps.pretrian --data X`", "steps.pretrian does not exist"),
        ("    mlflow run . -e finetune --env-manager local -P frozen_layer=3", "-P frozen_layer= is not a parameter"),
        ("    mlflow run . -e tune -P n_trials=3 \\\n        -P n_trails=3",
         "-P n_trails= is not a parameter of entry point 'tune'"),
        ("`evaluate -P precison=bf16`", "-P precison= is not a parameter of entry point 'evaluate'"),
        ("    mlflow run . --env-manager local -P epochs=3", "-P epochs= is not a parameter of entry point 'main'"),
        ("`-P resum=<run id>`", "-P resum= is a parameter of no entry point"),
    ],
)
def test_misspellings_are_caught_with_file_and_line(tmp_path, monkeypatch, text, expected):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n" + text + "\n")
    monkeypatch.setattr(f"{__name__}.doc_files", lambda: [page])
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    problems = step_option_problems()[0] + parameter_problems()[0]
    line = 3 + text.count("\n")  # the physical line of the misspelling, not of the command's start
    assert len(problems) == 1 and problems[0].startswith(f"page.md:{line}: ") and expected in problems[0], problems


def test_correct_commands_pass(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("    python -m steps.pretrain --data <prepare_data run id> --epochs 5 --arch resnet34\n"
                    "    torchrun --standalone --nproc-per-node 2 -m steps.finetune --data X --frozen-layers 3\n"
                    "    mlflow run . -e prune --env-manager local -P model=<run id> -P pruning_ratio=0.3\n"
                    "`finetune -P pretrained=` and `python -m steps.compare --help`\n")
    monkeypatch.setattr(f"{__name__}.doc_files", lambda: [page])
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert step_option_problems() == ([], 6)
    assert parameter_problems() == ([], 3)


def _slug(heading: str) -> str:
    """The anchor GitHub and MkDocs' toc both give a heading (for the headings used here)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_into_docs_exist():
    """README.md is outside the MkDocs site, so its strict build does not check the README's links."""
    readme = (ROOT / "README.md").read_text()
    problems, checked = [], 0
    for number, line in enumerate(readme.splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = ROOT / path
            checked += 1
            if not file.exists():
                problems.append(f"README.md:{number}: {target}: no such file")
            elif anchor:
                headings = re.findall(r"^#{1,6} (.*)$", file.read_text(), re.MULTILINE)
                if anchor not in {_slug(h) for h in headings}:
                    problems.append(f"README.md:{number}: {target}: no heading with anchor #{anchor}")
    assert not problems, "broken links in README.md:\n" + "\n".join(problems)
    assert checked >= 10
