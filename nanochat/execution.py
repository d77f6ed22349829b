"""Run model-written Python in a sandboxed child process (HumanEval scoring, tool calls).

    result = execute_code("print(1 + 1)", SandboxLimits(timeout_s=5))
    result.success, result.stdout, result.error

Layers, outermost first; each is applied when the OS allows it and `result.isolation` lists what was active:
- a fresh interpreter (`python -I`) in its own session/process group, a private temp working directory,
  an empty environment, stdin closed, output read through a capped pipe (the run is killed past the cap);
- `pidns`+`netns`: new PID and network namespaces (as root directly, otherwise inside a new user namespace).
  The code runs as PID 1 of its namespace, so when it exits or is killed every process it started dies with it,
  including grandchildren that called setsid(); the network namespace has no interfaces up, not even loopback;
- `uid`: when the parent is root, the code runs as an unprivileged uid unique to this run (so RLIMIT_NPROC
  counts only its own processes and root-owned files are out of reach);
- `landlock`: a Landlock ruleset (Linux >= 5.13) that forbids writing, creating or deleting files anywhere but
  the temp dir and /dev/null, and (ABI >= 4) every TCP bind/connect, and (ABI >= 6) signalling processes
  outside the sandbox;
- rlimits on CPU seconds, address space, processes, file size, open files, and no core dumps;
- Python-level guards: os.system, exec*/spawn*, kill, subprocess and ctypes are removed before the code runs,
  and the socket module too when neither netns nor Landlock blocks the network.

What it does NOT protect against, honestly:
- Reading: any file the (possibly unprivileged) user can read stays readable (Landlock only restricts writes).
- As root, modules the program imports by name are imported before the uid drop (a pyenv interpreter under
  /root is unreadable to that uid); a module imported dynamically later may then fail to load.
- The Python-level guards are speed bumps; code can dig ctypes back out. The OS layers are the real walls.
  Without a PID namespace (e.g. Docker's default seccomp profile forbids unshare) a grandchild that calls
  setsid() can outlive the run; without Landlock and not as root, files the user owns can be written; without
  netns and Landlock the network is reachable through any socket the guards miss. Where the kernel offers none
  of the OS layers, only the rlimits, the process group and the guards remain.
- Kernel exploits, side channels, and exhausting disk space in the temp dir up to the file-size limit per file.
- UDP and non-TCP sockets are blocked only by the network namespace, not by Landlock.
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


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0          # wall clock for the whole run
    cpu_seconds: int = 10            # RLIMIT_CPU
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS (address space)
    max_processes: int = 32          # RLIMIT_NPROC
    max_file_bytes: int = 16 * 2**20  # RLIMIT_FSIZE, per file written
    max_open_files: int = 64         # RLIMIT_NOFILE
    max_output_bytes: int = 2**20    # stdout + stderr captured; the run is killed past it


@dataclass
class ExecutionResult:
    success: bool                   # exited with status 0 inside every limit
    stdout: str
    stderr: str
    error: str | None = None        # why it did not succeed, one line
    exit_code: int | None = None
    timed_out: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    isolation: list[str] = field(default_factory=list)  # which layers were active (see module docstring)


# The child's first act: read its config, enter namespaces, drop privileges, set limits, install guards, run the
# code. Kept as source text because it must run in the fresh interpreter before any user code.
PRELUDE = r'''
import ctypes, json, os, resource, signal, sys
config = json.loads(sys.argv[3])
workdir, limits = config["workdir"], config["limits"]
libc = ctypes.CDLL(None, use_errno=True)
isolation = []
report_fd = config["report_fd"]

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000

def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)

def enter_namespaces():
    if os.geteuid() == 0:
        return libc.unshare(CLONE_NEWPID | CLONE_NEWNET) == 0
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET) != 0:
        return False
    try:
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError:
        pass
    return True

if enter_namespaces():
    isolation += ["pidns", "netns"]
    child = os.fork()
    if child:
        # Outside the namespace: relay the exit status. Our death kills PID 1 (pdeathsig), and with it the namespace.
        os.close(report_fd)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)  # killed by signal n: 128 + n, as a shell reports it

def die_with_relay():
    """PID 1 gets SIGKILL when the relay dies, even after a setsid() took it out of the killed group. Set again
    after the uid drop, which clears it."""
    if "pidns" in isolation:
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

die_with_relay()

# CPU: SIGXCPU at the soft limit, SIGKILL one second later if the code catches it.
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_AS", limits["memory_bytes"]),
                    ("RLIMIT_FSIZE", limits["max_file_bytes"]), ("RLIMIT_NOFILE", limits["max_open_files"]),
                    ("RLIMIT_NPROC", limits["max_processes"])):
    resource.setrlimit(getattr(resource, name), (value, value))

with open("program.py", encoding="utf-8") as f:
    source = f.read()

def preload_imports():
    """Import what the program names before the uid drop: the interpreter may live where that uid can't read."""
    import ast, importlib
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:
            pass

if os.geteuid() == 0:
    preload_imports()
    uid = config["sandbox_uid"]
    os.chown(workdir, uid, uid)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    isolation.append("uid")
    die_with_relay()

def landlock():
    """Writes only under workdir and /dev/null; no TCP; no signals or abstract sockets outside (by ABI)."""
    SYS_create, SYS_add_rule, SYS_restrict = 444, 445, 446  # the same numbers on x86-64 and arm64
    abi = libc.syscall(SYS_create, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return False
    # WRITE_FILE, REMOVE_DIR, REMOVE_FILE, MAKE_{CHAR,DIR,REG,SOCK,FIFO,BLOCK,SYM}; + REFER (2), TRUNCATE (3).
    # Reading and executing are not handled, so they stay allowed everywhere.
    write_rights = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))
    if abi >= 2:
        write_rights |= 1 << 13
    if abi >= 3:
        write_rights |= 1 << 14
    net_rights = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL: nothing outside this domain
    attr = (ctypes.c_uint64 * 3)(write_rights, net_rights, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(SYS_create, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return False
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    for path, rights in ((workdir, write_rights), ("/dev/null", 1 << 1)):
        fd = os.open(path, os.O_PATH)
        rule = PathBeneath(rights, fd)
        ok = libc.syscall(SYS_add_rule, ruleset, 1, ctypes.byref(rule), 0) == 0
        os.close(fd)
        if not ok:
            return False
    PR_SET_NO_NEW_PRIVS = 38
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    done = libc.syscall(SYS_restrict, ruleset, 0) == 0
    os.close(ruleset)
    if done:
        isolation.append(f"landlock-abi{abi}")
    return done and abi >= 4

network_blocked = landlock() or "netns" in isolation

with os.fdopen(report_fd, "w") as report:
    report.write(json.dumps(isolation))

# os.fork stays: the process limit and the PID namespace contain it, and tests exercise exactly that.
import posix
for module in (os, posix):
    for name in list(vars(module)):
        if name in ("system", "popen", "kill", "killpg", "forkpty", "posix_spawn", "posix_spawnp") \
                or name.startswith(("exec", "spawn")):
            delattr(module, name)
for name in ("ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing"):
    sys.modules[name] = None
if not network_blocked:
    sys.modules["socket"] = sys.modules["_socket"] = None
del libc, ctypes
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


def _sandbox_uid() -> int:
    # A uid no account uses, fresh per run: RLIMIT_NPROC then counts only this run's processes.
    return 0x70000000 + secrets.randbelow(0x0FFFFFFF)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(proc: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout/stderr until both close or a limit trips; returns (out, err, timed_out, truncated)."""
    deadline = time.monotonic() + limits.timeout_s
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


def execute_code(code: str, limits: SandboxLimits | None = None, label: str = "") -> ExecutionResult:
    """Run `code` as a script in the sandbox and report what happened; never raises for anything the code does."""
    limits = limits or SandboxLimits()
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    report_read, report_write = os.pipe()
    try:
        os.chmod(workdir, 0o700)
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        config = {"workdir": workdir, "limits": asdict(limits), "sandbox_uid": _sandbox_uid(),
                  "report_fd": report_write}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", PRELUDE, SANDBOX_MARKER, label or "-", json.dumps(config)],
            cwd=workdir, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, pass_fds=(report_write,))
        os.close(report_write)
        report_write = -1
        try:
            stdout, stderr, timed_out, truncated = _read_capped(proc, limits)
            if not (timed_out or truncated):
                try:
                    proc.wait(timeout=max(0.1, limits.timeout_s))
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
            report_read = -1
            text = report.read()
        isolation = json.loads(text) if text else []
    finally:
        for fd in (report_read, report_write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    return _summarize(proc.returncode, stdout, stderr, timed_out, truncated, isolation)


def _signal_of(returncode: int) -> int:
    """The signal that ended the code: negative codes come from Popen, 128+n from the namespace relay."""
    if returncode < 0:
        return -returncode
    return returncode - 128 if 128 < returncode < 128 + 65 else 0


def _summarize(returncode: int, stdout: bytes, stderr: bytes, timed_out: bool, truncated: bool,
               isolation: list[str]) -> ExecutionResult:
    out, err = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
    memory_exceeded = "MemoryError" in err
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
    else:
        error = None
    return ExecutionResult(success=error is None, stdout=out, stderr=err, error=error, exit_code=returncode,
                           timed_out=timed_out, memory_exceeded=memory_exceeded, output_truncated=truncated,
                           isolation=isolation)
