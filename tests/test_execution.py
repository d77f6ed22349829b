"""The sandbox: each escape attempt must be contained, and the parent must survive and reap everything."""
import functools
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanochat import execution
from nanochat.execution import SANDBOX_MARKER, SandboxLimits, execute_code
from tasks.humaneval import HumanEval

REPO = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(timeout_s=4, cpu_seconds=3)
# The import guard is a speed bump: this recovers ctypes from the child's leftovers to call libc directly, so
# the tests below check the OS layers, not the guard.
DIG_LIBC = (
    "import gc\n"
    "ctypes_ns = next(o for o in gc.get_objects() if isinstance(o, dict) and o.get('__name__') == 'ctypes'"
    " and 'CDLL' in o)\n"
    "libc = ctypes_ns['CDLL'](None, use_errno=True)\n"
)


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


@functools.lru_cache(maxsize=None)
def active_layers() -> tuple[str, ...]:
    return tuple(execute_code("pass", FAST).isolation)


def require_layer(layer: str, reason: str) -> None:
    """Skip, saying why, where the kernel or the privileges here do not offer `layer` (see result.isolation)."""
    if not any(active == layer or active.startswith(f"{layer}-") for active in active_layers()):
        pytest.skip(f"no {layer} layer here ({reason}); active: {', '.join(active_layers()) or 'none'}")


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
    # The OS layers (uid drop, Landlock) must stop the write.
    outside = [tmp_path / "pwned_by_ctypes", f"/tmp/pwned-{uuid.uuid4().hex}"]
    code = DIG_LIBC + "".join(f"print(libc.system(b'touch {path}'))\n" for path in outside)
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


def assert_cannot_reach(server: socket.socket, connect: str) -> None:
    """The program whose line `connect` opens `s` to the bound `server` must neither connect nor send."""
    server.listen(1)
    server.settimeout(0.5)
    result = execute_code(f"import socket\n{connect}\ns.sendall(b'escaped')\nprint('connected')\n", FAST)
    with pytest.raises(socket.timeout):
        server.accept()
    assert not result.success and "connected" not in result.stdout


def test_socket_to_loopback_is_blocked():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert_cannot_reach(server, f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)")


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


# Each escape runs before tests that would fail: a program that stops early must never count as passed.
EARLY_EXITS = {
    "exit": "exit()",
    "sys.exit": "sys.exit(0)",
    "SystemExit": "raise SystemExit",
    "os._exit": "os._exit(0)",
    "kill the process group": DIG_LIBC + "libc.kill(0, signal.SIGKILL)",
    "forged sentinel": "print('\\nnanochat-sandbox-done-' + '0' * 32 + ' ok', flush=True)\nos._exit(0)",
}


@pytest.mark.parametrize("escape", EARLY_EXITS.values(), ids=EARLY_EXITS.keys())
def test_stopping_before_the_tests_end_fails(escape):
    code = f"import os, signal, sys\n{escape}\nassert False, 'the tests fail'\n"
    result = execute_code(code, FAST)
    assert not result.success and result.error


def test_program_cannot_find_the_sentinel():
    # Everything a program can read without digging through memory: argv, environment, cmdline, open fds.
    code = (
        "import os, sys\n"
        "found = [repr(sys.argv), repr(dict(os.environ)), repr(open('/proc/self/cmdline', 'rb').read())]\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        found.append(repr(os.read(fd, 4096)))\n"
        "    except OSError:\n"
        "        pass\n"
        "print('\\n'.join(found))\n"
        "os._exit(0)\n"
    )
    result = execute_code(code, FAST)
    assert not result.success and "sandbox-done" not in result.stdout


@pytest.mark.slow
def test_every_canonical_humaneval_solution_passes(shared_data):
    humaneval = HumanEval(data_dir=shared_data / "eval")
    examples = [humaneval[i] for i in range(len(humaneval))]
    assert len(examples) == 164

    def passes(example):
        return humaneval.evaluate(example, example["messages"][1]["content"])

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(passes, examples))
    assert [e["task_id"] for e, ok in zip(examples, results) if not ok] == []


def test_printing_memory_error_is_not_running_out_of_memory():
    result = execute_code("import sys\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)", FAST)
    assert not result.success and not result.memory_exceeded and result.error == "MemoryError"


def test_closing_stdout_and_stderr_keeps_the_time_limit():
    start = time.monotonic()
    # Close them late in the run: the wait after the pipes close must not get a fresh timeout of its own.
    code = "import os, time\ntime.sleep(1.5)\nos.close(1)\nos.close(2)\ntime.sleep(60)"
    result = execute_code(code, SandboxLimits(timeout_s=2))
    assert time.monotonic() - start <= 2 + 1
    assert result.timed_out and not result.success


def test_other_processes_are_invisible():
    require_layer("proc", "needs a mount and a PID namespace")
    secret = f"secret-{uuid.uuid4().hex}"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", secret],
                                 env={"NANOCHAT_TEST_SECRET": secret})
    code = (
        "import os\n"
        "pids = sorted(entry for entry in os.listdir('/proc') if entry.isdigit())\n"
        "seen = b''\n"
        "for pid in pids:\n"
        "    for name in ('cmdline', 'environ'):\n"
        "        try:\n"
        "            seen += open(f'/proc/{pid}/{name}', 'rb').read()\n"
        "        except OSError:\n"
        "            pass\n"
        f"print(pids, {secret.encode()!r} in seen)\n"
    )
    try:
        result = execute_code(code, FAST)
    finally:
        bystander.kill()
        bystander.wait()
    assert result.success, result.stderr
    assert result.stdout in ("['1'] False\n", "[] False\n")  # only itself, or nothing where /proc is hidden


def test_unix_socket_connect_is_blocked():
    require_layer("seccomp", "Landlock up to ABI 7 cannot stop a connect to a socket file; seccomp needs x86-64/arm64")
    directory = tempfile.mkdtemp()  # a path the sandbox uid can reach: the socket is the only wall tested
    stream_path, datagram_path = os.path.join(directory, "stream.sock"), os.path.join(directory, "datagram.sock")
    os.chmod(directory, 0o755)
    try:
        with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as inbox:
            server.bind(stream_path)
            inbox.bind(datagram_path)
            for path in (stream_path, datagram_path):
                os.chmod(path, 0o777)
            assert_cannot_reach(server, f"s = socket.socket(socket.AF_UNIX)\ns.connect({stream_path!r})")
            # A datagram socketpair can be re-connected to a socket file: only stream-like pairs are allowed.
            code = (f"import socket\ns, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                    f"s.connect({datagram_path!r})\ns.send(b'escaped')\n")
            assert not execute_code(code, FAST).success
            inbox.settimeout(0.5)
            with pytest.raises(socket.timeout):
                inbox.recv(16)
    finally:
        shutil.rmtree(directory)


def test_asyncio_still_runs():
    # Its event loop wakes itself through a stream socketpair, which the AF_UNIX filter lets through.
    code = "import asyncio\nasync def answer():\n    return 42\nprint(asyncio.run(answer()))"
    result = execute_code(code, FAST)
    assert result.success and result.stdout == "42\n", result.stderr


@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup where offered", "no cgroup"])
def test_forked_children_share_one_memory_bound(cgroup, monkeypatch):
    if not cgroup:  # as on a machine whose cgroups are read-only: RLIMIT_NPROC x RLIMIT_AS must fit the total
        monkeypatch.setattr(execution, "_make_memory_cgroup", lambda limit_bytes: None)
    block = 100 * 2**20
    limits = SandboxLimits(timeout_s=20, memory_bytes=384 * 2**20, total_memory_bytes=320 * 2**20, max_processes=16)
    code = (
        "import os, time\n"
        "children = []\n"
        "for _ in range(6):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        f"        block = b'x' * {block}\n"
        "        time.sleep(3)\n"
        "        print('held', flush=True)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "for pid in children:\n"
        "    os.waitpid(pid, 0)\n"
    )
    result = execute_code(code, limits)
    held_at_once = result.stdout.count("held")
    assert held_at_once * block <= limits.total_memory_bytes, result.isolation
    if any(layer.startswith("memcg") for layer in result.isolation):
        assert result.memory_exceeded and result.error == "memory limit exceeded"  # the cgroup's OOM kills count
    else:
        assert held_at_once == 0  # 320 MiB // 384 MiB: the program may not fork at all


# Loops that would put 1 GiB (8 MiB per file, under the per-file limit) or 10,000 files in the temp dir:
# (steps, one step, what a step adds, the limit that must stop it).
TEMP_DIR_FILLERS = {
    "1 GiB": (1024, "open(f'part{i // 8}', 'ab', buffering=0).write(bytes(2**20))", 2**20, "max_temp_bytes"),
    "10,000 files": (10_000, "open(f'empty{i}', 'w').close()", 1, "max_temp_files"),
}


@pytest.mark.parametrize("filler", TEMP_DIR_FILLERS.values(), ids=TEMP_DIR_FILLERS.keys())
def test_temp_dir_size_and_file_count_are_bounded(filler):
    require_layer("tmpfs", "needs a mount namespace; without one only RLIMIT_FSIZE bounds each file")
    steps, step, added, limit = filler
    limits = SandboxLimits(timeout_s=30, max_temp_bytes=32 * 2**20, max_temp_files=100)
    code = (f"total = 0\ntry:\n    for i in range({steps}):\n        {step}\n        total += {added}\n"
            "except OSError as error:\n    print(error.strerror)\nprint(total)\n")
    result = execute_code(code, limits)
    assert result.success, result.stderr
    assert int(result.stdout.split()[-1]) <= getattr(limits, limit)


HARNESS = """
import sys
from nanochat.execution import SandboxLimits, execute_code
execute_code("import time\\ntime.sleep(60)", SandboxLimits(timeout_s=60), label=sys.argv[1])
"""


def test_sandbox_dies_with_a_killed_harness():
    label = f"harness-killed-{uuid.uuid4().hex}"
    harness = subprocess.Popen([sys.executable, "-c", HARNESS, label], cwd=REPO)
    deadline = time.monotonic() + 30
    while not sandbox_processes(label) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # past the child's set-up, into the program's sleep
    harness.kill()
    harness.wait()
    assert_reaped(label)
    leftovers = f"{tempfile.gettempdir()}/{SANDBOX_MARKER}-{harness.pid}-*"
    assert glob.glob(leftovers)  # its temp dir: nobody was left to remove it
    assert execute_code("pass", FAST).success
    assert glob.glob(leftovers) == []  # the next run removes what a killed harness left


def test_ptrace_is_refused():
    require_layer("seccomp", "needs seccomp filters on x86-64 or arm64")
    code = DIG_LIBC + (
        "import os, time\n"
        "libc.prctl(4, 1, 0, 0, 0)\n"  # PR_SET_DUMPABLE, which the uid drop cleared and which ptrace checks
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(10)\n"
        "    os._exit(0)\n"
        "print(libc.ptrace(16, pid, 0, 0))\n"  # PTRACE_ATTACH to our own child: the most a tracer could hope for
    )
    result = execute_code(code, SandboxLimits(timeout_s=5, total_memory_bytes=2**30, memory_bytes=2**29))
    assert result.success, result.stderr
    assert result.stdout == "-1\n"


def test_program_modules_are_not_imported_before_the_uid_drop():
    if os.geteuid() != 0:
        pytest.skip("only a root harness drops to another uid")
    # Importing `this` prints; as root before the drop it would run even under `if False`.
    result = execute_code("if False:\n    import this\nimport sys\nprint('this' in sys.modules)", FAST)
    assert result.success and result.stdout == "False\n"


NON_ROOT_CHECK = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("execution", sys.argv[1])
ex = importlib.util.module_from_spec(spec)
sys.modules["execution"] = ex
spec.loader.exec_module(ex)
outside = f"/tmp/nonroot-escape-{os.getpid()}"
wrote = ex.execute_code(f"open({outside!r}, 'w').write('x')")
orphan = ex.execute_code("import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(60)\\n",
                         label=sys.argv[2])
peek = ex.execute_code(sys.argv[3])
print(json.dumps({"isolation": wrote.isolation, "wrote": wrote.success, "exists": os.path.exists(outside),
                  "orphan_ok": orphan.success, "peek": peek.stdout, "peek_error": peek.error}))
"""
# This checker's environment holds the secret, and it runs as the same user as the sandboxed code: only the
# private /proc hides it, and only dropped capabilities stop the code unmounting that /proc.
PEEK_AT_ENVIRONS = DIG_LIBC + (
    "import os\n"
    "def environs():\n"
    "    seen = b''\n"
    "    for pid in [entry for entry in os.listdir('/proc') if entry.isdigit()]:\n"
    "        try:\n"
    "            seen += open(f'/proc/{pid}/environ', 'rb').read()\n"
    "        except OSError:\n"
    "            pass\n"
    "    return seen\n"
    "before = b'NONROOT_SECRET=' in environs()\n"
    "libc.umount2(b'/proc', 2)\n"
    "print(before, b'NONROOT_SECRET=' in environs())\n"
)


@pytest.mark.slow
def test_sandbox_started_by_an_unprivileged_user():
    # The root path drops to a fresh uid; this checks the other path: user namespace + Landlock, no uid change.
    system_python = "/usr/bin/python3"
    module = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "execution.py")
    if os.geteuid() != 0 or not os.path.exists(system_python):
        pytest.skip("needs root (to become nobody) and a system python3")
    label = f"nonroot-{uuid.uuid4().hex}"
    result = subprocess.run([system_python, "-I", "-c", NON_ROOT_CHECK, module, label, PEEK_AT_ENVIRONS],
                            user=65534, group=65534, extra_groups=[], cwd="/", capture_output=True, text=True,
                            timeout=120, env={"NONROOT_SECRET": uuid.uuid4().hex})
    if result.returncode != 0 and "Permission denied" in result.stderr:
        pytest.skip(f"{module} is not readable by nobody")
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout)
    isolation = outcome["isolation"]
    assert {"pidns", "proc", "tmpfs", "nocaps", "nogroups", "seccomp"} <= set(isolation)
    assert any(layer.startswith("landlock") for layer in isolation) and "uid" not in isolation
    assert (outcome["wrote"], outcome["exists"], outcome["orphan_ok"]) == (False, False, True)
    assert outcome["peek"] == "False False\n", outcome["peek_error"]
    assert_reaped(label)
