"""The ringkern command: info reports the build; demo trains the tiny model and decodes its answer."""
import subprocess
import sys


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ringkern", *args], capture_output=True, text=True, timeout=timeout)


def test_info_lists_ops_and_build():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    assert "ringkern 0.1.0" in res.stdout and "rms_norm" in res.stdout
    assert "CUDA kernels compiled in:" in res.stdout
    if "compiled in: yes" in res.stdout:
        assert "CUTLASS kernels:" in res.stdout


def test_bad_subcommand_is_an_error():
    assert _run("frobnicate").returncode != 0
