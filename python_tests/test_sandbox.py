"""The code sandbox: correct and wrong code score as expected; every hostile program scores 0, is stopped
within its limits, and leaves this (the trainer's) process alive and able to work."""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringkern import sandbox
from ringkern.sandbox import IsolationSupport, code_reward, extract_code, run_code_tests

TIMEOUT_S = 2.0
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-4, 4) == 0", "assert add(10, 5) == 15"]
CONFINED = sandbox.isolation_support().namespaces
needs_namespaces = pytest.mark.skipif(not CONFINED, reason=f"no namespaces: {sandbox.isolation_support().reason}")


def assert_trainer_healthy() -> None:
    """This process still runs Python, allocates memory and starts processes."""
    assert sum(bytearray(1 << 20)) == 0
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=30).returncode == 0


def run_hostile(code: str, **limits):
    start = time.monotonic()
    result = run_code_tests(code, ["assert True"], timeout_s=TIMEOUT_S, **limits)
    assert time.monotonic() - start < TIMEOUT_S + 2.0
    assert result.reward == 0.0 and result.passed == 0 and result.total == 1
    assert_trainer_healthy()
    return result


def test_correct_code_passes_every_test():
    result = run_code_tests("def add(a, b):\n    return a + b\n", ADD_TESTS)
    assert (result.passed, result.total, result.reward, result.status) == (3, 3, 1.0, "ok")
    assert "rlimits" in result.isolation


def test_wrong_code_scores_its_pass_fraction():
    result = run_code_tests("def add(a, b):\n    return a * 2 if a == b else a + b + (a < 0)\n", ADD_TESTS)
    assert (result.passed, result.total, result.status) == (2, 3, "ok")
    assert result.reward == pytest.approx(2 / 3)
    assert "AssertionError" in result.stderr_tail


def test_string_tests_count_asserts_and_run_setup():
    tests = ("import math\n\ndef twice(x):\n    return 2 * x\n\n"
             "assert twice(add(1, 1)) == 4\nassert math.isclose(add(0.1, 0.2), 0.3)\n")
    result = run_code_tests("def add(a, b):\n    return a + b\n", tests)
    assert (result.passed, result.total, result.reward) == (2, 2, 1.0)


def test_code_that_raises_or_exits_scores_zero():
    for code in ("raise RuntimeError('boom')", "import sys\nsys.exit(0)", "import os\nos._exit(0)", "def add(:"):
        assert run_code_tests(code, ADD_TESTS).reward == 0.0, code


def test_forged_report_is_rejected():
    code = 'print(\'{"nonce": "guess", "passed": [true, true, true], "errors": []}\')\nimport os\nos._exit(0)'
    result = run_code_tests(code, ADD_TESTS)
    assert (result.passed, result.reward, result.status) == (0, 0.0, "error")


def test_infinite_loop_times_out():
    assert run_hostile("while True:\n    pass\n").status == "timeout"


def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_hostile(code, max_processes=16)
    assert result.status == "timeout"


def test_memory_hog_fails():
    result = run_hostile("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n", memory_mb=256)
    assert result.status == "memory"


def test_big_file_is_stopped_by_the_file_size_limit():
    result = run_hostile("with open('big.bin', 'wb') as f:\n    f.write(b'0' * (8 << 20))\n", max_file_mb=1)
    assert result.status == "file_size"


def test_network_attempt_fails():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
                "socket.create_connection(('1.1.1.1', 53), timeout=1)\n")
        run_hostile(code)
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()


@needs_namespaces
def test_file_system_escape_is_blocked(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("original")
    code = (f"import os, sys\nsys.stderr.write('CWD=' + os.getcwd() + '\\n')\n"
            f"for path in ({str(target)!r}, {str(tmp_path / 'new.txt')!r}, '/tmp/ringkern-escape.txt'):\n"
            "    try:\n        open(path, 'w').write('pwned')\n    except OSError:\n        pass\n"
            "raise SystemExit('done')\n")
    result = run_hostile(code)
    assert target.read_text() == "original"
    assert not (tmp_path / "new.txt").exists() and not Path("/tmp/ringkern-escape.txt").exists()
    cwd = re.search(r"CWD=(\S+)", result.stderr_tail).group(1)
    assert "ringkern-sandbox-" in cwd and not os.path.exists(cwd)
    assert {"namespaces", "readonly_fs", "no_caps"} <= set(result.isolation)


@needs_namespaces
def test_child_sees_only_its_own_processes():
    tests = ["import os\nassert os.getpid() == 1",
             "assert all(int(p) < 100 for p in os.listdir('/proc') if p.isdigit())"]
    assert run_code_tests("x = 1", tests).reward == 1.0


def test_socket_guard_fallback_blocks_python_sockets(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_support", lambda: IsolationSupport(False, None, "test fallback"))
    good = run_code_tests("def add(a, b):\n    return a + b\n", ADD_TESTS)
    assert good.reward == 1.0 and "socket_guard" in good.isolation and "namespaces" not in good.isolation
    blocked = run_code_tests("import socket\nsocket.socket()", ["assert True"])
    assert blocked.reward == 0.0 and "PermissionError" in blocked.stderr_tail


def test_code_reward_uses_the_last_python_block():
    completion = ("<think>\nfirst try\n```python\ndef add(a, b):\n    return a - b\n```\n</think>\n\n"
                  "```python\ndef add(a, b):\n    return a + b\n```")
    assert extract_code(completion).strip() == "def add(a, b):\n    return a + b"
    assert code_reward(completion, ADD_TESTS) == 1.0
    assert code_reward("no code here", ADD_TESTS) == 0.0
    assert extract_code(None) is None


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="tests"):
        run_code_tests("x = 1", "assert (")
    with pytest.raises(ValueError, match="tests"):
        run_code_tests("x = 1", "x = 2")
    with pytest.raises(ValueError, match="timeout_s"):
        run_code_tests("x = 1", ["assert True"], timeout_s=0)
    assert run_code_tests("   ", ADD_TESTS).status == "no_code"
