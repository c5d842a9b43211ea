"""Lab tests run `python -m labs SCENARIO --json` as a user would and check every check passed."""

import json
import subprocess
import sys

import pytest


def run_lab(*args: str, timeout: float = 300) -> dict:
    result = subprocess.run([sys.executable, "-m", "labs", *args, "--json"], capture_output=True, text=True,
                            timeout=timeout)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"labs {' '.join(args)} printed no report (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed and result.returncode == 0, json.dumps(failed, indent=2) + "\n" + result.stderr[-3000:]
    return report


@pytest.fixture
def lab_run():
    return run_lab
