"""Start-up cost: a run that draws no figure must not import matplotlib (about 2 s on 2 cores)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROGRAM = """
import sys
from perdiag.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit_:
    assert exit_.code in (0, None), exit_.code
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("matplotlib", "ot"))
assert not loaded, loaded
"""


def test_inspect_with_tables_only_imports_no_plotting_or_transport_library(tmp_path):
    checkpoint = ROOT / "sample_checkpoints" / "digits_mlp.pt"
    out = tmp_path / "layers.csv"
    subprocess.run(
        [sys.executable, "-c", _PROGRAM, "inspect", str(checkpoint), "--quiet", "--max-batches", "1", "--csv", str(out), "--json", str(tmp_path / "l.json")],
        check=True, cwd=tmp_path, capture_output=True, text=True,
    )
    assert out.read_text().startswith("layer,")
