"""The README's commands name options and entry points that exist (the README stays true)."""

import importlib
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    """Indented code lines of the README, with backslash continuations joined."""
    lines, current = [], ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("    ") or (current and line.startswith("  ")):
            current += " " + line.strip().rstrip("\\")
            if not line.rstrip().endswith("\\"):
                lines.append(current.strip())
                current = ""
    return lines


def _options(step: str) -> set[str]:
    return {opt for p in importlib.import_module(f"steps.{step}").main.params for opt in p.opts}


def test_step_commands_use_existing_options():
    checked = 0
    for cmd in _commands():
        for match in re.finditer(r"-m steps\.(\w+)((?: +[^|>&;#]+)?)", cmd):
            step, rest = match.groups()
            flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest))
            unknown = flags - _options(step)
            assert not unknown, f"README: `{cmd}` uses {unknown}, not options of steps.{step}"
            checked += 1
    assert checked >= 10


def test_mlflow_run_commands_use_existing_entry_points_and_parameters():
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    checked = 0
    for cmd in _commands():
        if not cmd.startswith("mlflow run ."):
            continue
        entry = re.search(r" -e (\w+)", cmd)
        name = entry.group(1) if entry else "main"
        assert name in entry_points, f"README: `{cmd}` names no entry point {name!r}"
        for param in re.findall(r"-P (\w+)=", cmd):
            assert param in entry_points[name]["parameters"], f"README: `{cmd}`: {name} has no parameter {param!r}"
        checked += 1
    assert checked >= 10
