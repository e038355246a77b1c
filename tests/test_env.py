"""check_env on this machine, and what import errors of flash-attn mean."""

import subprocess
import sys

import torch
from attnkit.backends import BACKENDS, probe
from attnkit.backends.probe import package_probe as probe_package
from attnkit.env import environment, explain_import_error
from conftest import run_script


def test_check_env_reports_this_machine():
    run = run_script("check_env.py")
    assert run.rc == 0 and run.result["status"] == "pass"
    data = run.result["data"]
    assert data["torch_version"] == torch.__version__
    assert data["cuda_available"] == torch.cuda.is_available()
    cpu = {k["name"]: k for k in data["sdpa_kernels"]["cpu"]}
    assert cpu["flash"]["compiled"] and cpu["math"]["compiled"]
    assert data["transformers"]["importable"]
    assert data["recommendation"]["backend"] in ("sdpa", "flash_attention_2", "flash_attention_3")
    names = {f["name"] for f in data["facts"]}
    assert {"torch", "CUDA", "flash_attn", "flash_attn_interface", "transformers"} <= names


def test_missing_flash_attn_is_explained_not_crashed():
    probe = probe_package("flash_attn")
    if probe.importable:  # a machine with flash-attn: nothing to explain
        return
    # by pip distribution, not by import: with only FlashAttention-4 installed, `import flash_attn`
    # succeeds (an empty namespace package) and FA2 is still not installed
    assert probe.error == "PackageNotFoundError: no pip distribution flash-attn"
    assert probe.meaning.startswith("not installed: pip install flash-attn")


def test_requiring_flash_attn_fails_with_the_reason_when_absent():
    env = environment()
    run = run_script("check_env.py", "--require", "flash_attn")
    if probe.imports(BACKENDS["flash_attention_2"]).importable and probe.installed(BACKENDS["flash_attention_2"]) \
            and env.cuda_available:
        assert run.rc == 0
        return
    assert run.rc == 1 and run.result["status"] == "fail"
    assert not run.check("flash_attn")["passed"]
    assert "flash_attn" in run.result["summary"]


def test_unknown_requirement_is_a_usage_error():
    run = run_script("check_env.py", "--require", "tpu")
    assert run.rc == 2 and "invalid choice" in run.result["summary"]


def test_import_errors_are_read_for_what_they_mean():
    # a real failed import of a module that does not exist
    try:
        import flash_attn_definitely_missing  # noqa: F401
    except ModuleNotFoundError as exc:
        assert explain_import_error("flash_attn_definitely_missing", exc).startswith("not installed")
    # the messages the loader gives for an ABI mismatch and a CPU-only torch (from flash-attn issues)
    abi = ImportError("/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                      "_ZN3c104cuda9SetDeviceEi")
    assert "built against another torch" in explain_import_error("flash_attn", abi)
    cpu = ImportError("libc10_cuda.so: cannot open shared object file: No such file or directory")
    assert "CUDA libraries cannot be loaded" in explain_import_error("flash_attn", cpu)
    old_gpu = RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
    assert "Ampere (sm80) or newer" in explain_import_error("flash_attn", old_gpu)


def test_check_env_runs_from_a_plain_copy_of_the_scripts(tmp_path):
    # a skill is installed by copying its folder: no pip install of ours
    import shutil

    from conftest import SCRIPTS

    shutil.copytree(SCRIPTS, tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, str(tmp_path / "scripts" / "check_env.py"), "--json"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
