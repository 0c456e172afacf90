"""The README's code must run as printed, and every public name it advertises must import from the top level."""
from __future__ import annotations

import re
from pathlib import Path

import torchrl_dreammpc

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_names_are_exported():
    text = README.read_text()
    table = text.split("## What is in it", 1)[1].split("##", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    names = {name for cell in first_cells for name in re.findall(r"`(\w+)", cell)}
    assert {"GradientMPCPlanner", "MPPIPlanner", "PolicyActor", "DreamMPCTrainer"} <= names
    missing = [n for n in names if n not in torchrl_dreammpc.__all__ or not hasattr(torchrl_dreammpc, n)]
    assert not missing, f"README advertises names the package does not export: {missing}"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "expected exactly one python example in the README"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.split()
    # two collector batches and one evaluation rollout each print a reward sum
    assert len(printed) == 3, printed
