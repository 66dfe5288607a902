"""The CI gate of tests/conftest.py: under CI=true a skipped test fails the run (and -rs names it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def run_pytest(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_demo.py").write_text(
        "import pytest\n\ndef test_runs():\n    pass\n\n@pytest.mark.skip(reason='no broker here')\ndef test_needs_more():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true" if ci else "false"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_demo.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_skip_fails_the_run_under_ci_and_not_locally(tmp_path: Path) -> None:
    ci = run_pytest(tmp_path, ci=True)
    assert ci.returncode == 1 and "no broker here" in ci.stdout and "fail this run" in ci.stdout, ci.stdout[-2000:]
    local = run_pytest(tmp_path, ci=False)
    assert local.returncode == 0 and "no broker here" in local.stdout, local.stdout[-2000:]
