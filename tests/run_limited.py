"""Run a step script under a real address-space limit: what this process maps now + N MB.

usage: python tests/run_limited.py EXTRA_MB SCRIPT [ARGS...]

The libraries are imported before the limit is set, so the limit bounds what the step
allocates while it measures: a real out-of-memory error, not a simulated one.
"""

import resource
import runpy
import sys
from pathlib import Path

scripts = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(scripts))
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
from attnkit import cli  # noqa: E402,F401
from attnkit.steps import enable_flash  # noqa: E402,F401

extra = int(sys.argv[1]) * 2**20
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + extra, vm + extra))
sys.argv = [str(scripts / sys.argv[2])] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
