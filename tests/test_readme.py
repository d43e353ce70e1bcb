"""README's quickstart is what CI runs: the test command in README.md is verbatim in .ci/run."""

import re

from conftest import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    test_command = [c for c in readme_commands() if "pytest" in c]
    assert len(test_command) == 1
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command[0] in ci_lines


def test_quickstart_inspects_the_shipped_sample():
    inspect = [c for c in readme_commands() if "perdiag inspect" in c]
    assert inspect and "sample_checkpoints/digits_cnn.pt" in inspect[0]
    assert (ROOT / "sample_checkpoints" / "digits_cnn.pt").exists()
