"""The mutation run (scripts/mutate.py): every targeted mutant is killed by its tests.

Slow (each mutant runs its test files against a broken copy of the code): ``pytest -m slow
tests/test_mutation.py``. The default suite holds the tests that do the killing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_mutant_is_killed() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutate.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    score = lines[-1]
    print("\n" + proc.stdout)
    assert proc.returncode == 0, f"{score}\n{proc.stdout}{proc.stderr}"
    killed, _, total = score.removeprefix("score: ").split()[0].partition("/")
    assert killed == total and int(total) >= 18, score
    assert not [line for line in lines if line.startswith(("SURVIVED", "ERROR"))]


def test_the_mutant_list_is_well_formed() -> None:
    """Fast: every mutant names an existing file, finds its snippet exactly once there and
    changes it, and names existing test files (a stale mutant fails here, not in the slow
    run). The issue's three are in the list."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import mutate
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    names = [m.name for m in mutate.MUTANTS]
    assert len(names) == len(set(names)) >= 18
    for m in mutate.MUTANTS:
        text = (ROOT / m.path).read_text()
        assert m.path.startswith("morphcli/") and text.count(m.old) == 1, m.name
        assert m.old != m.new and m.what and m.tests, m.name
        for t in m.tests:
            assert (ROOT / t.split("::")[0]).is_file(), (m.name, t)
    assert {"deepen-bn-eps", "allowlist-operator-exclusion", "check-worst-raw"} <= set(names)
