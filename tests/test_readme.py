"""The README's Python example runs as printed (in a fresh process, torch backend)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from lego.experiment import load_runs, table1, table2

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for code in blocks:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), "the example prints its result"


def test_readme_tables_are_the_committed_results():
    """The ASHEM tables in the README are what ``python -m lego.experiment tables``
    makes of the JSON files under ``results/``, digit for digit."""
    text = (ROOT / "README.md").read_text()
    tables = (("table1", table1), ("table2", table2), ("shape2", table2), ("table4", table2))
    for folder, make in tables:
        runs = load_runs(str(ROOT / "results" / folder))
        assert runs, f"results/{folder} holds no run"
        assert make(runs) in text, f"README.md does not show the table of results/{folder}"


def test_readme_generate_tables_are_the_committed_results():
    """The tokens/s tables of the README's Generate section are those of the committed
    ``python -m bench.generate`` run, row for row."""
    text = (ROOT / "README.md").read_text()
    results = (ROOT / "bench" / "results" / "cpu" / "generate.md").read_text()
    rows = [line for line in results.splitlines() if line.startswith("| ")]
    assert len(rows) > 20
    for row in rows:
        assert row in text, f"README.md lacks the row {row!r} of bench/results/cpu/generate.md"
