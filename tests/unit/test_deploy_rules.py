"""deploy/prometheus: the alert rules are valid and their own tests pass (promtool, Debian's)."""

import shutil
import subprocess

import pytest

RULES = "deploy/prometheus"


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make setup` installs Debian's prometheus package"
    return path


def test_rules_are_valid(promtool):
    r = subprocess.run(
        [promtool, "check", "rules", "dabba-rules.yaml"], cwd=RULES, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 10 rules found" in r.stdout


def test_alerts_fire_when_they_should_and_only_then(promtool):
    """Certificate expiry ((expiry - time()) < 6h, and expired) and plaintext between mesh
    workloads, against input series: see dabba-rules.test.yaml."""
    r = subprocess.run(
        [promtool, "test", "rules", "dabba-rules.test.yaml"],
        cwd=RULES,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
