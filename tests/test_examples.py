"""The examples run as README says (slow: not part of the default suite; needs the examples
extra, pip install -e '.[examples]')."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grow_digits_keeps_accuracy_across_each_morph(tmp_path: Path) -> None:
    plot = tmp_path / "plot.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "grow_digits.py"),
                           "--steps", "30", "--plot", str(plot)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = re.findall(r"step +(\d+) +(before|after) +(.+?): test accuracy (\d\.\d+)",
                       proc.stdout)
    assert [(s, w) for s, w, _, _ in found] == [("10", "before"), ("10", "after"),
                                                ("20", "before"), ("20", "after")], proc.stdout
    for before, after in (found[0:2], found[2:4]):
        assert before[2] == after[2]  # the same morph
        assert before[3] == after[3], proc.stdout  # accuracy kept, to the printed digits
    diffs = [float(d) for d in re.findall(r"max abs logit difference on the test set (\S+);",
                                          proc.stdout)]
    assert len(diffs) == 2 and all(d <= 1e-5 for d in diffs), proc.stdout
    assert re.search(r"final test accuracy after 30 steps: grown 0\.\d+, from scratch 0\.\d+",
                     proc.stdout)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
