"""Code rewards: run untrusted model-written Python against tests, never inside the trainer's process.

:func:`run_code_tests` runs ``code`` and then ``tests`` in a child process and returns a
:class:`SandboxResult` (tests passed, pass fraction, status); :func:`code_reward` scores a completion by
its last fenced ```python block. The same file is the child's entry point: the child runs
``python -I -S ringkern/sandbox.py PAYLOAD`` (isolated mode, no site-packages, so only the standard
library is importable and no environment variable or user file changes its behaviour).

Isolation, in layers; ``SandboxResult.isolation`` names the layers a run actually got.

Always (any OS user, any Linux):
  - ``rlimits``: set in the child before exec (``preexec_fn``): RLIMIT_AS (``memory_mb``; allocation
    past it raises MemoryError), RLIMIT_CPU (CPU seconds, the backstop of the wall-clock timeout),
    RLIMIT_NPROC (``max_processes``; ignored by Linux for uid 0), RLIMIT_FSIZE (``max_file_mb`` per
    file; a write past it fails with EFBIG, as Python ignores SIGXFSZ), RLIMIT_NOFILE (64 open files), RLIMIT_CORE = 0.
  - a new session (``start_new_session``): on timeout the whole process group gets SIGKILL; the
    parent waits at most ``timeout_s`` (plus the kill) and never blocks on the child's output.
  - a fresh temporary directory as cwd and HOME, removed afterwards; a minimal environment (PATH, LANG,
    HOME); stdin is /dev/null; stdout/stderr go to files in that directory (bounded by RLIMIT_FSIZE),
    of which only the tails are read back.
  - the child reports its results as one JSON line carrying a random nonce it read from a payload file
    that it deletes before running the code, and must exit 0: printing a fake result, ``sys.exit`` or
    ``os._exit`` count as failures. Code that deliberately digs the nonce out of the runner's frames
    could still forge a pass, and the tests run in the code's namespace, so an object whose ``__eq__``
    always returns True passes ``assert f(x) == y`` (write tests that check types too): a policy
    optimised against this reward can in principle learn such hacks.

Where a cgroup ``pids`` controller is writable (root, cgroup v1 ``pids`` or a v2 root offering it):
  - ``pids_cgroup``: the child joins a fresh cgroup with ``pids.max = max_processes`` before exec
    (RLIMIT_NPROC does not bind uid 0): a fork bomb gets EAGAIN; the cgroup is emptied and removed after.

As root where ``unshare`` works (checked once per process, :func:`isolation_support`):
  - ``namespaces``: the child starts under ``unshare --net --pid --mount --ipc --uts --fork
    --kill-child --mount-proc``. A new network namespace has only a loopback device that is down, so
    no connection to any host, the internet or the trainer's own listening sockets is possible. A new
    PID namespace: the code sees only its own processes, cannot signal the trainer, and every process
    it forked dies with it (``--kill-child`` ties the namespace's init to ``unshare``).
  - ``readonly_fs``: inside the mount namespace the child bind-mounts its cwd, makes every mount
    read-only recursively (``mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)``) and makes only the cwd
    writable again: writes anywhere else (the repository, /tmp, /dev/shm) fail with EROFS. Reads are
    not restricted: the code can read any file uid 0 may read.
  - ``no_caps``: the child then drops every capability (bounding set, effective/permitted/inheritable,
    ambient) and sets no_new_privs, so it cannot undo the mounts; it stays uid 0 without privileges.

Fallback (not root, no ``unshare``, or it is not permitted): ``socket_guard`` only, which is weaker:
the runner replaces the socket constructors of ``socket`` and ``_socket`` before the code runs, so
ordinary networking raises PermissionError, but code that loads a C extension or spawns a program
(``curl``) can still reach the network, and the file system is writable wherever the OS user can
write. Fork bombs are bounded by RLIMIT_NPROC for a non-root user, by the pids cgroup for root.
"""
from __future__ import annotations

import ast
import ctypes
import errno
import functools
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PAYLOAD_FILE = "payload.json"
PROBE_ARG = "--probe"  # child argument: confine, then exit 0 (see isolation_support)
STDOUT_FILE, STDERR_FILE = "stdout.txt", "stderr.txt"
TAIL_BYTES = 2000
MAX_OPEN_FILES = 64
UNSHARE_ARGS = ("--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc")

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class SandboxResult:
    """passed/total tests and reward = passed/total (0 unless the child reported back).

    status: "ok" (the runner reported, whatever the tests did), "timeout" (wall clock or CPU limit),
    "memory" (a MemoryError), "file_size" (RLIMIT_FSIZE hit: SIGXFSZ, or EFBIG under Python), "error"
    (the child died or its report was missing or forged), "no_code" (nothing to run).
    """

    passed: int
    total: int
    reward: float
    status: str
    stderr_tail: str
    isolation: tuple[str, ...] = ()
    elapsed_s: float = 0.0


# ====================================================================== parent side
def extract_code(completion: str) -> str | None:
    """The body of the last ```python (or ```py) fenced block of ``completion``; None if there is none."""
    if not isinstance(completion, str):
        return None
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else None


def code_reward(completion: str, tests: str | list[str], **limits) -> float:
    """Pass fraction in [0, 1] of the completion's last ```python block against ``tests``; 0 without one.

    ``limits`` go to :func:`run_code_tests` (timeout_s, memory_mb, max_processes, max_file_mb).
    """
    code = extract_code(completion)
    if code is None:
        return 0.0
    return run_code_tests(code, tests, **limits).reward


def run_code_tests(code: str, tests: str | list[str], *, timeout_s: float = 5.0, memory_mb: int = 512,
                   max_processes: int = 32, max_file_mb: int = 16) -> SandboxResult:
    """Run ``code`` then ``tests`` in an isolated child process (see the module docstring).

    tests: a list of snippets, each one test (it passes if it runs without raising), all sharing the
    namespace the code defined; or one string whose top-level ``assert`` statements are the tests and
    whose other top-level statements (imports, helpers) run in order as setup. Never raises on bad
    ``code``; raises ValueError on bad ``tests`` or limits, which are trusted input.
    """
    steps = _test_steps(tests)
    _check_limits(timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes, max_file_mb=max_file_mb)
    total = sum(step["is_test"] for step in steps)
    if not isinstance(code, str) or not code.strip():
        return SandboxResult(0, total, 0.0, "no_code", "")
    start = time.monotonic()
    support = isolation_support()
    workdir = Path(tempfile.mkdtemp(prefix="ringkern-sandbox-"))
    cgroup = _make_pids_cgroup(max_processes)
    layers = (("namespaces", "readonly_fs", "no_caps") if support.namespaces else ("socket_guard",))
    layers = ("rlimits",) + layers + (("pids_cgroup",) if cgroup else ())
    try:
        nonce = secrets.token_hex(16)
        payload = {"code": code, "steps": steps, "nonce": nonce, "confine": support.namespaces}
        (workdir / PAYLOAD_FILE).write_text(json.dumps(payload), encoding="utf-8")
        limits = _Limits(timeout_s, memory_mb, max_processes, max_file_mb)
        returncode, timed_out = _run_child(workdir, support, limits, cgroup)
        stdout = _tail(workdir / STDOUT_FILE, 1 << 16)
        stderr = _tail(workdir / STDERR_FILE, TAIL_BYTES)
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup)
        shutil.rmtree(workdir, ignore_errors=True)
    passed, status = _judge(stdout, stderr, nonce, returncode, timed_out, total)
    reward = passed / total  # passed is 0 unless the child reported back
    return SandboxResult(passed, total, reward, status, stderr[-TAIL_BYTES:], layers, time.monotonic() - start)


def _test_steps(tests: str | list[str]) -> list[dict]:
    """[{"src", "is_test"}] in run order; validates ``tests``."""
    if isinstance(tests, str):
        try:
            tree = ast.parse(tests)
        except SyntaxError as err:
            raise ValueError(f"tests: not valid Python ({err.msg}, line {err.lineno})") from None
        steps = [{"src": ast.get_source_segment(tests, node), "is_test": isinstance(node, ast.Assert)}
                 for node in tree.body]
    elif isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        steps = [{"src": t, "is_test": True} for t in tests]
    else:
        raise ValueError(f"tests: expected a str or a list of str, got {type(tests).__name__}")
    if not any(step["is_test"] for step in steps):
        raise ValueError("tests: no test found (a list needs at least one snippet, a string at least one assert)")
    return steps


def _check_limits(**limits: float) -> None:
    for name, value in limits.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name}={value!r}: expected a positive number")


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_processes: int
    max_file_mb: int


@dataclass(frozen=True)
class IsolationSupport:
    """What this machine allows: ``namespaces`` (root and a working ``unshare``), its path."""

    namespaces: bool
    unshare: str | None
    reason: str


@functools.lru_cache(maxsize=1)
def isolation_support() -> IsolationSupport:
    """Probe once whether the namespaces, the read-only mounts and the capability drop all work here
    (runs the child's confinement in a throwaway directory)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return IsolationSupport(False, None, "no unshare binary (util-linux)")
    if os.geteuid() != 0:
        return IsolationSupport(False, unshare, "not root: namespaces need CAP_SYS_ADMIN")
    argv = [unshare, *UNSHARE_ARGS, sys.executable, "-I", "-S", str(Path(__file__).resolve()), PROBE_ARG]
    with tempfile.TemporaryDirectory(prefix="ringkern-sandbox-probe-") as cwd:
        try:
            probe = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            return IsolationSupport(False, unshare, f"unshare failed: {err}")
    if probe.returncode != 0:
        return IsolationSupport(False, unshare, f"confinement refused: {probe.stderr.decode(errors='replace')[-300:]}")
    return IsolationSupport(True, unshare, "ok")


def _pids_cgroup_root() -> Path | None:
    """A writable cgroup directory with the pids controller (v1 ``pids`` or a v2 root offering it)."""
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "cgroup.procs").is_file() and os.access(v1, os.W_OK):
        return v1
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.subtree_control"
    if controllers.is_file() and "pids" in controllers.read_text().split() and os.access(v2, os.W_OK):
        return v2
    return None


def _make_pids_cgroup(max_processes: int) -> Path | None:
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = root / f"ringkern-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(math.ceil(max_processes)))
    except OSError:
        _remove_cgroup(path)
        return None
    return path


def _remove_cgroup(path: Path) -> None:
    """Kill whatever is still in the cgroup, then remove it (retrying while the kernel reaps)."""
    for _ in range(50):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _preexec(limits: _Limits, cgroup: Path | None):
    """The function run in the forked child before exec: join the cgroup, set the rlimits."""
    settings = [
        (resource.RLIMIT_AS, math.ceil(limits.memory_mb * 2**20)),
        (resource.RLIMIT_CPU, math.ceil(limits.timeout_s) + 1),
        (resource.RLIMIT_NPROC, math.ceil(limits.max_processes)),
        (resource.RLIMIT_FSIZE, math.ceil(limits.max_file_mb * 2**20)),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
        (resource.RLIMIT_CORE, 0),
    ]
    procs = None if cgroup is None else str(cgroup / "cgroup.procs")

    def apply() -> None:
        if procs is not None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        for which, value in settings:
            hard = value + 1 if which == resource.RLIMIT_CPU else value
            resource.setrlimit(which, (value, hard))

    return apply


def _run_child(workdir: Path, support: IsolationSupport, limits: _Limits,
               cgroup: Path | None) -> tuple[int, bool]:
    """Start the child, wait for it with the wall-clock limit; returns (returncode, timed_out)."""
    argv = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), PAYLOAD_FILE]
    if support.namespaces:
        argv = [support.unshare, *UNSHARE_ARGS, *argv]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir)}
    with open(workdir / STDOUT_FILE, "wb") as out, open(workdir / STDERR_FILE, "wb") as err:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True, preexec_fn=_preexec(limits, cgroup))
    exited = _wait_unreaped(proc.pid, limits.timeout_s)
    # Kill the whole group while the (possibly zombie) leader still holds its id, so that the id
    # cannot have been reused by an unrelated process group; then reap.
    _kill_group(proc.pid)
    return proc.wait(), not exited


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` to exit without reaping it; True if it exited."""
    deadline = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _judge(stdout: str, stderr: str, nonce: str, returncode: int, timed_out: bool,
           total: int) -> tuple[int, str]:
    """(tests passed, status) from the child's output and exit."""
    if timed_out or returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return 0, "timeout"
    if returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):
        return 0, "file_size"
    report = _find_report(stdout, nonce)
    if report is None or returncode != 0:
        return 0, ("memory" if "MemoryError" in stderr else "error")
    passed = sum(bool(p) for p in report.get("passed", []))
    if passed > total:
        return 0, "error"
    errors = report.get("errors", [])
    if "MemoryError" in errors:
        return passed, "memory"
    return passed, ("file_size" if "OSError[EFBIG]" in errors else "ok")


def _find_report(stdout: str, nonce: str) -> dict | None:
    lines = stdout.rstrip("\n").rsplit("\n", 1)
    try:
        report = json.loads(lines[-1])
    except (json.JSONDecodeError, IndexError):
        return None
    if not isinstance(report, dict) or not secrets.compare_digest(str(report.get("nonce", "")), nonce):
        return None
    return report


# ====================================================================== child side (runs under python -I -S)
_MS_BIND = 4096
_SYS_MOUNT_SETATTR = 442  # the same number on every Linux architecture (added in 5.12)
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise OSError(ctypes.get_errno(), f"sandbox: {what} failed: {os.strerror(ctypes.get_errno())}")


def _readonly_except_cwd(libc) -> None:
    """Every mount read-only, recursively, except a bind mount of the cwd (we are in our own mount ns)."""
    cwd = os.getcwd().encode()
    _check(libc.mount(cwd, cwd, None, _MS_BIND, None) == 0, "bind-mounting the work directory")
    os.chdir(cwd)  # step onto the new mount
    libc.syscall.restype = ctypes.c_long
    ro = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)
    _check(libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(ro),
                        ctypes.sizeof(ro)) == 0, "making / read-only")
    rw = _MountAttr(attr_clr=_MOUNT_ATTR_RDONLY)
    _check(libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, cwd, 0, ctypes.byref(rw), ctypes.sizeof(rw)) == 0,
           "making the work directory writable")


def _drop_capabilities(libc) -> None:
    """No capabilities left in any set and no way to regain them (no_new_privs)."""
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    cap = 0
    while libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data) == 0, "capset")


def _guard_sockets() -> None:
    """Fallback network block: socket construction raises (weak: see the module docstring)."""
    import _socket
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the ringkern sandbox")

    for module in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "fromfd"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def _error_name(err: BaseException) -> str:
    """``MemoryError``, ``OSError[EFBIG]``...: the type, plus the errno name for OS errors."""
    name = type(err).__name__
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    return f"{name}[{errno.errorcode.get(code, code)}]" if code is not None else name


def _run_step(src: str, filename: str, namespace: dict, errors: list[str]) -> bool:
    """exec one piece of code in ``namespace``; on failure note the error (list and stderr) and return False."""
    try:
        exec(compile(src, filename, "exec"), namespace)
        return True
    except BaseException as err:  # the code may raise anything, SystemExit and KeyboardInterrupt included
        name = _error_name(err)
        errors.append(name)
        os.write(2, f"{filename}: {name}: {str(err)[:200]}\n".encode(errors="replace"))
        return False


def _run_steps(code: str, steps: list[dict]) -> tuple[list[bool], list[str]]:
    """Run the code, then each step, in one namespace; (pass flag per test, error names)."""
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    errors: list[str] = []
    setup_ok = _run_step(code, "solution.py", namespace, errors)
    passed = []
    for i, step in enumerate(steps):
        ok = setup_ok and _run_step(step["src"], f"test_{i}.py", namespace, errors)
        if step["is_test"]:
            passed.append(ok)
        elif not ok:
            setup_ok = False
    return passed, errors


def _confine() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    _readonly_except_cwd(libc)
    _drop_capabilities(libc)


def _child_main(arg: str) -> None:
    if arg == PROBE_ARG:
        _confine()
        return
    with open(arg, encoding="utf-8") as f:
        payload = json.load(f)
    os.unlink(arg)
    if payload["confine"]:
        _confine()
    else:
        _guard_sockets()
    report_fd = os.dup(1)
    passed, errors = _run_steps(payload["code"], payload["steps"])
    try:
        sys.stdout.flush()  # the code's own output first; it may have closed or replaced sys.stdout
    except BaseException:
        pass
    report = json.dumps({"nonce": payload["nonce"], "passed": passed, "errors": errors[:20]})
    os.write(report_fd, ("\n" + report + "\n").encode())
    os._exit(0)  # skip atexit hooks and finalizers the code may have registered


if __name__ == "__main__":
    _child_main(sys.argv[1])
