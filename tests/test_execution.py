"""The sandbox: each escape attempt must be contained, and the parent must survive and reap everything."""
import os
import socket
import subprocess
import time
import uuid

import pytest

from nanochat.execution import SANDBOX_MARKER, SandboxLimits, execute_code

FAST = SandboxLimits(timeout_s=4, cpu_seconds=3)


def sandbox_processes(label: str) -> list[int]:
    """PIDs of live processes started by the sandbox run labelled `label` (they carry it on the command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if SANDBOX_MARKER.encode() in argv and label.encode() in argv and state != "Z":
            pids.append(int(entry))
    return pids


def assert_reaped(label: str) -> None:
    deadline = time.monotonic() + 2
    while sandbox_processes(label) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes(label) == []


def test_runs_code_and_captures_output():
    result = execute_code("import sys\nprint('hello')\nprint('oops', file=sys.stderr)", FAST)
    assert result.success and result.error is None
    assert result.stdout == "hello\n" and result.stderr == "oops\n"


def test_failure_reports_the_exception_line():
    result = execute_code("raise ValueError('bad input')", FAST)
    assert not result.success
    assert result.error == "ValueError: bad input"


def test_environment_is_empty_stdin_closed_cwd_private():
    code = "import os, sys\nprint(dict(os.environ))\nprint(repr(sys.stdin.read()))\nprint(os.listdir('.'))"
    os.environ["NANOCHAT_SECRET_FOR_TEST"] = "leak"
    try:
        result = execute_code(code, FAST)
    finally:
        del os.environ["NANOCHAT_SECRET_FOR_TEST"]
    assert result.success, result.stderr
    assert "leak" not in result.stdout
    assert result.stdout.splitlines()[1] == "''"
    assert result.stdout.splitlines()[2] == "['program.py']"


def test_posix_system_is_contained(tmp_path):
    target = tmp_path / "pwned_by_system"
    result = execute_code(f"import posix\nposix.system('touch {target}')", FAST)
    assert not result.success
    assert not target.exists()


def test_os_exec_is_contained(tmp_path):
    target = tmp_path / "pwned_by_exec"
    result = execute_code(f"import os\nos.execv('/usr/bin/touch', ['touch', '{target}'])", FAST)
    assert not result.success
    assert not target.exists()


def test_ctypes_import_is_blocked():
    result = execute_code("import ctypes\nctypes.CDLL(None).system(b'true')", FAST)
    assert not result.success and "ctypes" in result.error


def test_ctypes_dug_out_of_memory_still_cannot_write_outside(tmp_path):
    # The import guard is a speed bump: recover ctypes from the prelude's leftovers and call libc directly.
    # The OS layers (uid drop, Landlock) must still stop the write.
    outside = [tmp_path / "pwned_by_ctypes", f"/tmp/pwned-{uuid.uuid4().hex}"]
    code = (
        "import gc\n"
        "ns = next(o for o in gc.get_objects() if isinstance(o, dict) and o.get('__name__') == 'ctypes'"
        " and 'CDLL' in o)\n"
        "libc = ns['CDLL'](None)\n"
        + "".join(f"print(libc.system(b'touch {path}'))\n" for path in outside)
    )
    result = execute_code(code, FAST)
    assert result.isolation, "no OS isolation layer was active"
    assert not any(os.path.exists(path) for path in outside)


def test_writing_outside_the_temp_dir_is_denied(tmp_path):
    outside = [tmp_path / "escaped.txt", f"/tmp/escaped-{uuid.uuid4().hex}.txt"]
    code = (
        "written = []\n"
        f"for path in {[str(p) for p in outside]!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        written.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "open('inside.txt', 'w').write('fine')\n"
        "print(written, open('inside.txt').read())\n"
    )
    result = execute_code(code, FAST)
    assert result.success, result.stderr
    assert result.stdout.strip() == "[] fine"
    assert not any(os.path.exists(path) for path in outside)


def test_infinite_loop_is_stopped():
    label = f"loop-{uuid.uuid4().hex}"
    start = time.monotonic()
    result = execute_code("while True:\n    pass", SandboxLimits(timeout_s=3, cpu_seconds=1), label=label)
    assert time.monotonic() - start < 5
    assert not result.success
    assert result.error in ("timed out", "cpu time limit exceeded")
    assert_reaped(label)


def test_sleeping_past_the_wall_clock_times_out():
    start = time.monotonic()
    result = execute_code("import time\ntime.sleep(60)", SandboxLimits(timeout_s=1))
    assert time.monotonic() - start < 3
    assert result.timed_out and result.error == "timed out"


def test_one_gigabyte_allocation_fails():
    result = execute_code("x = bytearray(10**9)\nprint('allocated')", SandboxLimits(memory_bytes=256 * 2**20))
    assert not result.success and result.memory_exceeded
    assert "allocated" not in result.stdout


def test_huge_print_is_capped():
    start = time.monotonic()
    result = execute_code("print('a' * 100_000_000)", SandboxLimits(max_output_bytes=2**16, timeout_s=10))
    assert time.monotonic() - start < 5
    assert result.output_truncated and result.error == "output limit exceeded"
    assert len(result.stdout) <= 2**16


def test_socket_to_loopback_is_blocked():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'escaped')\n"
            "print('connected')\n"
        )
        result = execute_code(code, FAST)
        with pytest.raises(socket.timeout):
            server.accept()
    assert not result.success and "connected" not in result.stdout


@pytest.mark.slow
def test_fork_bomb_is_contained_and_reaped():
    label = f"forkbomb-{uuid.uuid4().hex}"
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = execute_code(code, SandboxLimits(timeout_s=2, max_processes=16), label=label)
    assert time.monotonic() - start < 5
    assert not result.success
    assert_reaped(label)


def test_grandchild_that_outlives_the_run_is_killed():
    label = f"grandchild-{uuid.uuid4().hex}"
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(60)\n"
    )
    result = execute_code(code, SandboxLimits(timeout_s=1), label=label)
    assert result.timed_out
    assert_reaped(label)


def test_code_that_leaves_the_process_group_is_killed():
    label = f"setsid-{uuid.uuid4().hex}"
    result = execute_code("import os, time\nos.setsid()\ntime.sleep(60)\n", SandboxLimits(timeout_s=1), label=label)
    assert result.timed_out
    assert_reaped(label)


def test_grandchild_of_a_finished_run_is_killed():
    label = f"orphan-{uuid.uuid4().hex}"
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')\n"
    result = execute_code(code, SandboxLimits(timeout_s=5), label=label)
    assert result.success and result.stdout == "parent done\n"
    assert_reaped(label)


NON_ROOT_CHECK = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("execution", sys.argv[1])
ex = importlib.util.module_from_spec(spec)
sys.modules["execution"] = ex
spec.loader.exec_module(ex)
outside = f"/tmp/nonroot-escape-{os.getpid()}"
wrote = ex.execute_code(f"open({outside!r}, 'w').write('x')")
orphan = ex.execute_code("import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(60)\\n",
                         label=sys.argv[2])
print(" ".join(wrote.isolation), wrote.success, os.path.exists(outside), orphan.success)
"""


@pytest.mark.slow
def test_sandbox_started_by_an_unprivileged_user():
    # The root path drops to a fresh uid; this checks the other path: user namespace + Landlock, no uid change.
    system_python = "/usr/bin/python3"
    module = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "execution.py")
    if os.geteuid() != 0 or not os.path.exists(system_python):
        pytest.skip("needs root (to become nobody) and a system python3")
    label = f"nonroot-{uuid.uuid4().hex}"
    result = subprocess.run([system_python, "-I", "-c", NON_ROOT_CHECK, module, label], user=65534, group=65534,
                            extra_groups=[], cwd="/", capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "Permission denied" in result.stderr:
        pytest.skip(f"{module} is not readable by nobody")
    assert result.returncode == 0, result.stderr[-2000:]
    isolation, wrote, exists, orphan_ok = result.stdout.split()[:-3], *result.stdout.split()[-3:]
    assert "pidns" in isolation and any(layer.startswith("landlock") for layer in isolation)
    assert "uid" not in isolation
    assert (wrote, exists, orphan_ok) == ("False", "False", "True")
    assert_reaped(label)
