"""What CI must provide: with UNMIX_REQUIRE_SERVICES=1 (set by .ci/run) a test that lacks a service or
the browser fails; elsewhere it is skipped."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import ROOT

PROBE = '''
from tests.conftest import missing

def test_needs_a_browser():
    missing("chromium is not installed")
'''


def run_probe(tmp_path, require: bool) -> subprocess.CompletedProcess:
    probe = ROOT / "tests" / f"test_zz_probe_{os.getpid()}.py"
    probe.write_text(PROBE)
    try:
        env = {k: v for k, v in os.environ.items() if k != "UNMIX_REQUIRE_SERVICES"}
        if require:
            env["UNMIX_REQUIRE_SERVICES"] = "1"
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()


def test_a_missing_service_fails_in_ci_and_skips_elsewhere(tmp_path):
    ci = run_probe(tmp_path, require=True)
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "CI must provide it" in ci.stdout
    local = run_probe(tmp_path, require=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout


def test_ci_requires_everything():
    assert "export UNMIX_REQUIRE_SERVICES=1" in (ROOT / ".ci/run").read_text()
