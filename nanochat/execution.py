"""Run model-written Python in a sandboxed child process (HumanEval scoring, tool calls).

    result = execute_code("print(1 + 1)", SandboxLimits(timeout_s=5))
    result.success, result.stdout, result.error

Success means the program ran to its last line: the child (nanochat/sandbox_child.py) writes a random per-run
sentinel on stdout after the program's last statement returns, and only then. The sentinel reaches the child
through a pipe it reads and closes before the program starts (never argv, environment or a file), so exit(),
sys.exit(0), SystemExit, os._exit(0), a kill, or a printed look-alike all score as failures. `memory_exceeded`
comes from the child's own report of an uncaught MemoryError (tagged with the sentinel) or from the memory
cgroup's OOM-kill counter, never from the program's output. The wall-clock limit is one deadline for the run.

Layers, outermost first; each is applied when the OS allows it and `result.isolation` lists what was active:
- a fresh interpreter (`python -I`) in its own session/process group, a private temp working directory, an empty
  environment, stdin closed, output read through a capped pipe (the run is killed past the cap); the child gets
  SIGKILL when the harness dies (PR_SET_PDEATHSIG), so a killed harness leaves nothing running;
- `memcg-v2`/`memcg-v1`: as root, a fresh memory cgroup under the harness's own bounds the memory of all the
  run's processes together (`total_memory_bytes`, no swap); v2 where the memory controller is delegated to
  children, else the v1 memory hierarchy. Without one, RLIMIT_NPROC is cut to total_memory_bytes // memory_bytes
  (at least 1), so processes x RLIMIT_AS stays within the total;
- `pidns`+`netns`: new PID, network and mount namespaces (as root directly, otherwise inside a new user
  namespace). The code runs as PID 1 of its namespace, so when it exits or is killed every process it started
  dies with it, including grandchildren that called setsid(); the network has no interfaces, not even loopback;
- `proc`: a /proc mounted for that PID namespace, so no other process's cmdline or environ is visible
  (`proc-hidden`: the kernel refused one, and an empty tmpfs covers the host's /proc instead);
- `tmpfs`: the temp dir is a tmpfs of `max_temp_bytes` and `max_temp_files` inodes in the mount namespace
  (private: nothing propagates to the host), so the program's disk use is bounded (its pages count as memory);
- `uid`: when the parent is root, the code runs as an unprivileged uid unique to this run (so RLIMIT_NPROC
  counts only its own processes and root-owned files are out of reach), with no supplementary groups. Before the
  drop only stdlib modules on a fixed list (sandbox_child.PRELOADABLE) that the program names are imported;
- `nocaps`: not root, the capabilities a user namespace grants are dropped, so the code cannot unmount the
  private /proc or tmpfs to reveal the host's; `nogroups`: the code has no supplementary groups;
- `landlock-abiN`: a Landlock ruleset (Linux >= 5.13) that forbids writing, creating or deleting files anywhere
  but the temp dir and /dev/null, and (ABI >= 4) every TCP bind/connect, and (ABI >= 6) abstract Unix sockets
  and signals to processes outside the sandbox;
- `seccomp` (x86-64 and arm64): AF_UNIX socket() and datagram socketpair() fail, so no connect to a socket file
  (Landlock, up to ABI 7, cannot stop that; stream socketpairs stay, for asyncio); ptrace, process_vm_readv/
  writev, pidfd_getfd and io_uring fail; a syscall through another ABI (x32, int 0x80) kills the process;
- rlimits on CPU seconds, address space, processes, file size, open files, and no core dumps;
- Python-level guards: os.system, exec*/spawn*, kill, subprocess and ctypes are removed before the code runs,
  and the socket module too when neither netns nor Landlock blocks the network.

What it does NOT contain, honestly:
- Code written to beat the sentinel: it sits in the child's memory while the program runs, so a program that
  walks the interpreter's frames or memory (e.g. via ctypes dug back out), or skips lines from a trace
  function, can forge a pass. It stops programs that stop early, not an adversary aiming at the harness; nor
  does it stop a program that fools weak tests.
- Reading: any file the sandbox uid (or the unprivileged user) can read stays readable; Landlock limits writes.
- Not root: supplementary groups stay (the kernel forbids setgroups in a user namespace one maps oneself), so
  files readable through them stay readable; there is no cgroup, and RLIMIT_NPROC counts the user's processes
  only inside the run's user namespace. As root, a module off the preload list that lives where the sandbox
  uid cannot read (a pyenv under /root) fails to import.
- The Python-level guards are speed bumps; code can dig ctypes back out. The OS layers are the real walls.
  Without namespaces (e.g. Docker's default seccomp profile forbids unshare) a grandchild that calls setsid()
  can outlive the run, /proc shows every process, and the temp dir is bounded only per file (RLIMIT_FSIZE), not
  in total; without Landlock and not as root, files the user owns can be written; without netns and Landlock the
  network is reachable through any socket the guards miss. Where the kernel offers none of the OS layers, only
  the rlimits, the process group and the guards remain.
- Kernel exploits and side channels. UDP and non-TCP sockets other than AF_UNIX are blocked only by the network
  namespace. Threads count as processes for RLIMIT_NPROC, so the no-cgroup fallback also limits threads.
Run untrusted code on a machine you can afford to lose; this is a seatbelt, not a VM.
"""
from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

SANDBOX_MARKER = "nanochat-sandbox"
CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0          # wall clock for the whole run
    cpu_seconds: int = 10            # RLIMIT_CPU
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS (address space), per process
    total_memory_bytes: int = 2**30  # all the run's processes together (memory cgroup, else fewer processes)
    max_processes: int = 32          # RLIMIT_NPROC
    max_file_bytes: int = 16 * 2**20  # RLIMIT_FSIZE, per file written
    max_temp_bytes: int = 64 * 2**20  # the temp dir's size (its tmpfs), all files together
    max_temp_files: int = 1024       # files and directories in the temp dir (its tmpfs)
    max_open_files: int = 64         # RLIMIT_NOFILE
    max_output_bytes: int = 2**20    # stdout + stderr captured; the run is killed past it


@dataclass
class ExecutionResult:
    success: bool                   # ran to its last line, exited with status 0 inside every limit
    stdout: str
    stderr: str
    error: str | None = None        # why it did not succeed, one line
    exit_code: int | None = None
    timed_out: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    isolation: list[str] = field(default_factory=list)  # which layers were active (see module docstring)


def _leftover_prefix() -> str:
    return f"{SANDBOX_MARKER}-{os.getpid()}-"  # the harness's pid: see _remove_leftovers


def _remove_leftovers(directory: str, remove) -> None:
    """Remove what a killed harness left in `directory` (temp dirs, cgroups): names carry the pid of their
    harness, and a name whose harness is gone is a leftover."""
    for name in os.listdir(directory):
        if not name.startswith(f"{SANDBOX_MARKER}-"):
            continue
        try:
            os.kill(int(name.split("-")[2]), 0)
        except ProcessLookupError:
            remove(os.path.join(directory, name))
        except (ValueError, IndexError, PermissionError):
            pass


def _sandbox_uid() -> int:
    # A uid no account uses, fresh per run: RLIMIT_NPROC then counts only this run's processes.
    return 0x70000000 + secrets.randbelow(0x0FFFFFFF)


# Memory cgroup files by version: the limit, the swap limit, and the file whose `oom_kill N` line counts kills.
CGROUP_FILES = {"v2": ("memory.max", "memory.swap.max", "memory.events"),
                "v1": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.oom_control")}


def _own_memory_cgroup() -> tuple[str, str] | None:
    """(version, directory) of this process's memory cgroup when child cgroups there get a memory limit: v2 where
    `memory` is delegated to children (cgroup.subtree_control), else the v1 memory hierarchy."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            directory = "/sys/fs/cgroup" + path
            try:
                with open(os.path.join(directory, "cgroup.subtree_control")) as f:
                    if "memory" in f.read().split():
                        return "v2", directory
            except OSError:
                pass
        elif "memory" in controllers.split(","):
            return "v1", "/sys/fs/cgroup/memory" + path
    return None


def _make_memory_cgroup(limit_bytes: int) -> tuple[str, str] | None:
    """A fresh child memory cgroup limited to `limit_bytes` (no swap); None where we may not make one."""
    found = _own_memory_cgroup()
    if found is None:
        return None
    version, parent = found
    _remove_leftovers(parent, _remove_cgroup)
    directory = os.path.join(parent, _leftover_prefix() + secrets.token_hex(8))
    limit_file, swap_file, _ = CGROUP_FILES[version]
    try:
        os.mkdir(directory)
    except OSError:
        return None
    try:
        with open(os.path.join(directory, limit_file), "w") as f:
            f.write(str(limit_bytes))
    except OSError:
        _remove_cgroup(directory)
        return None
    extras = [(swap_file, "0" if version == "v2" else str(limit_bytes))]
    if version == "v2":
        extras.append(("memory.oom.group", "1"))  # an OOM kill takes every process of the run
    for name, value in extras:
        try:  # absent without swap accounting: then there is no swap to escape into either
            with open(os.path.join(directory, name), "w") as f:
                f.write(value)
        except OSError:
            pass
    return version, directory


def _oom_kills(version: str, directory: str) -> int:
    try:
        with open(os.path.join(directory, CGROUP_FILES[version][2])) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _remove_cgroup(directory: str) -> None:
    # The killed processes leave the cgroup a moment after the kill; rmdir fails (EBUSY) until they have.
    deadline = time.monotonic() + 5
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(proc: subprocess.Popen, limits: SandboxLimits, deadline: float) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout/stderr until both close or a limit trips; returns (out, err, timed_out, truncated)."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in buffers:
        selector.register(stream, selectors.EVENT_READ)
    total, timed_out, truncated = 0, False, False
    while selector.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in selector.select(timeout=min(remaining, 0.5)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                continue
            take = chunk[: max(0, limits.max_output_bytes - total)]
            buffers[key.fileobj] += take
            total += len(chunk)
            if total > limits.max_output_bytes:
                truncated = True
                break
        if truncated:
            break
    selector.close()
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), timed_out, truncated


def _run_child(workdir: str, limits: SandboxLimits, label: str, sentinel: bytes,
               cgroup: tuple[str, str] | None) -> tuple[int, bytes, bytes, bool, bool, list[str]]:
    """Start sandbox_child.py on `workdir`, read its output within the limits, and reap it."""
    deadline = time.monotonic() + limits.timeout_s
    report_read, report_write = os.pipe()
    sentinel_read, sentinel_write = os.pipe()
    os.write(sentinel_write, sentinel)  # the child reads it and closes the pipe before the program starts
    os.close(sentinel_write)
    # Without a cgroup to bound the total, fewer processes keep processes x RLIMIT_AS under it.
    processes_without_cgroup = max(1, min(limits.max_processes, limits.total_memory_bytes // limits.memory_bytes))
    config = {"workdir": workdir, "limits": asdict(limits), "processes_without_cgroup": processes_without_cgroup,
              "sandbox_uid": _sandbox_uid(), "harness_pid": os.getpid(),
              "report_fd": report_write, "sentinel_fd": sentinel_read,
              "cgroup_procs": os.path.join(cgroup[1], "cgroup.procs") if cgroup else None}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", CHILD_SCRIPT, SANDBOX_MARKER, label or "-", json.dumps(config)],
            cwd=workdir, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, pass_fds=(report_write, sentinel_read))
    finally:
        os.close(report_write)
        os.close(sentinel_read)
    try:
        stdout, stderr, timed_out, truncated = _read_capped(proc, limits, deadline)
        if not (timed_out or truncated):
            try:  # the same deadline: closing stdout and stderr early must not buy a second timeout
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        # The group holds everything that did not setsid(); PID 1's death takes the namespace with it.
        _kill_group(proc.pid)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        with os.fdopen(report_read, "r") as report:
            text = report.read()
    isolation = json.loads(text) if text else []
    return proc.returncode, stdout, stderr, timed_out, truncated, isolation


def execute_code(code: str, limits: SandboxLimits | None = None, label: str = "") -> ExecutionResult:
    """Run `code` as a script in the sandbox and report what happened; never raises for anything the code does."""
    limits = limits or SandboxLimits()
    _remove_leftovers(tempfile.gettempdir(), lambda path: shutil.rmtree(path, ignore_errors=True))
    workdir = tempfile.mkdtemp(prefix=_leftover_prefix())
    cgroup = _make_memory_cgroup(limits.total_memory_bytes) if os.geteuid() == 0 else None
    sentinel = f"nanochat-sandbox-done-{secrets.token_hex(16)}".encode()
    try:
        os.chmod(workdir, 0o700)
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        returncode, stdout, stderr, timed_out, truncated, isolation = _run_child(
            workdir, limits, label, sentinel, cgroup)
        oom_killed = cgroup is not None and _oom_kills(*cgroup) > 0
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup[1])
        shutil.rmtree(workdir, ignore_errors=True)
    if cgroup is not None and "memcg" in isolation:
        isolation[isolation.index("memcg")] = f"memcg-{cgroup[0]}"
    return _summarize(returncode, stdout, stderr, sentinel, timed_out, truncated, oom_killed, isolation)


def _signal_of(returncode: int) -> int:
    """The signal that ended the code: negative codes come from Popen, 128+n from the namespace relay."""
    if returncode < 0:
        return -returncode
    return returncode - 128 if 128 < returncode < 128 + 65 else 0


def _outcome(stdout: bytes, sentinel: bytes) -> tuple[bytes, bytes | None]:
    """The program's own output and what the child reported after it ran (`ok`, `MemoryError`), if it did."""
    for outcome in (b"ok", b"MemoryError"):
        line = b"\n" + sentinel + b" " + outcome + b"\n"
        at = stdout.rfind(line)
        if at >= 0:
            return stdout[:at] + stdout[at + len(line):], outcome
    return stdout, None


def _summarize(returncode: int, stdout: bytes, stderr: bytes, sentinel: bytes, timed_out: bool, truncated: bool,
               oom_killed: bool, isolation: list[str]) -> ExecutionResult:
    stdout, outcome = _outcome(stdout, sentinel)
    out, err = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
    memory_exceeded = oom_killed or outcome == b"MemoryError"
    if timed_out:
        error = "timed out"
    elif truncated:
        error = "output limit exceeded"
    elif memory_exceeded:
        error = "memory limit exceeded"
    elif _signal_of(returncode) in (signal.SIGXCPU, signal.SIGKILL):
        error = "cpu time limit exceeded"
    elif _signal_of(returncode):
        error = f"killed by {signal.Signals(_signal_of(returncode)).name}"
    elif returncode != 0:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        error = last or f"exit code {returncode}"
    elif outcome != b"ok":
        error = "exited before its last line ran"
    else:
        error = None
    return ExecutionResult(success=error is None, stdout=out, stderr=err, error=error, exit_code=returncode,
                           timed_out=timed_out, memory_exceeded=memory_exceeded, output_truncated=truncated,
                           isolation=isolation)
