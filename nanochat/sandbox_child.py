"""The sandbox's child process: run by nanochat.execution as `python -I sandbox_child.py MARKER LABEL CONFIG`.

Its first acts, in order, before any of the program's code: read the completion sentinel from its pipe and close
it, die with the harness, join the memory cgroup, enter new namespaces (then fork: the code runs as PID 1, this
process stays outside as the relay), mount a private /proc and a size-limited tmpfs over the work dir, set
rlimits, drop to the sandbox uid (root) or drop capabilities (otherwise), apply Landlock and seccomp, remove the
Python-level escape hatches. Then it runs program.py and, only when the program's last line has run, writes
`<sentinel> ok` on stdout. nanochat.execution documents what each layer contains.
"""
import ctypes
import json
import os
import resource
import signal
import sys
import types

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 22, 38

# Imported as root before the uid drop when the program names them, because the interpreter may live where the
# sandbox uid cannot read (pyenv under /root). A fixed list of stdlib modules that do nothing when imported: the
# program never picks code that runs as root. Anything else it imports loads after the drop, or fails to.
PRELOADABLE = frozenset("""
    abc array asyncio base64 binascii bisect calendar cmath collections collections.abc colorsys contextlib copy csv
    dataclasses datetime decimal difflib enum fractions functools graphlib hashlib heapq hmac io itertools json
    keyword math numbers operator pprint queue random re secrets statistics string struct textwrap time types
    typing unicodedata zlib
""".split())

# Seccomp, per architecture: (AUDIT_ARCH, syscalls refused outright, socket, socketpair). Refused outright:
# ptrace, process_vm_readv/writev and pidfd_getfd (reading another process's memory or fds), and
# io_uring_setup/enter/register (its socket and connect operations would bypass the filter).
SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, (101, 310, 311, 438, 425, 426, 427), 41, 53),
    "aarch64": (0xC00000B7, (117, 270, 271, 438, 425, 426, 427), 198, 199),
}

libc = ctypes.CDLL(None, use_errno=True)


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def die_with_parent(expected_parent: int | None) -> None:
    """SIGKILL when the parent dies, so nothing outlives a killed harness. Set again after a uid drop, which
    clears it. The getppid check closes the race with a parent that died before the prctl (PID 1 of a namespace
    cannot see its parent's pid, so it passes None)."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(128 + signal.SIGKILL)


def enter_namespaces() -> bool:
    """New PID, network and mount namespaces (in a new user namespace when not root)."""
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS
    if os.geteuid() == 0:
        return libc.unshare(flags) == 0
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags | CLONE_NEWUSER) != 0:
        return False
    try:
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError:
        pass
    return True


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> bool:
    source_b, target_b, fstype_b, data_b = (None if text is None else text.encode()
                                            for text in (source, target, fstype, data))
    return libc.mount(source_b, target_b, fstype_b, flags, data_b) == 0


def mount_private_views(workdir: str, limits: dict, owner: int, isolation: list[str]) -> None:
    """In our mount namespace: a /proc that shows only this PID namespace, and a tmpfs over the work dir that
    bounds its bytes and files. Mounts stay private, so nothing propagates back to the host."""
    if not mount("none", "/", None, MS_REC | MS_PRIVATE):
        return
    if mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC):
        isolation.append("proc")
    elif mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=555"):
        isolation.append("proc-hidden")  # the kernel refused a new proc here: hide the host's instead
    options = f"size={limits['max_temp_bytes']},nr_inodes={limits['max_temp_files']},mode=700,uid={owner},gid={owner}"
    if mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, options):
        isolation.append("tmpfs")
        os.chdir(workdir)  # the old cwd is the directory under the mount


def set_rlimits(limits: dict, processes: int, relay_counts: bool) -> None:
    """RLIMIT_NPROC counts this uid's processes (in its user namespace): with a user namespace of our own the
    relay is one of them, and the program keeps its full allowance."""
    # CPU: SIGXCPU at the soft limit, SIGKILL one second later if the code catches it.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_FSIZE", limits["max_file_bytes"]), ("RLIMIT_NOFILE", limits["max_open_files"]),
                        ("RLIMIT_NPROC", processes + relay_counts)):
        resource.setrlimit(getattr(resource, name), (value, value))


def preload_imports(source: str) -> None:
    """Import the PRELOADABLE modules the program names (parsed, never run)."""
    import ast
    import importlib
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    for name in sorted(names & PRELOADABLE):
        importlib.import_module(name)


def drop_capabilities() -> bool:
    """A new user namespace grants every capability inside it; without them the code cannot unmount our /proc
    or tmpfs to see what is under them, nor make new namespaces of its own with privileges."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all zero
    return libc.capset(header, data) == 0


def landlock(workdir: str, isolation: list[str]) -> bool:
    """Writes only under workdir and /dev/null; no TCP; no signals or abstract sockets outside (by ABI).
    Returns whether TCP is blocked."""
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
        ok = libc.syscall(SYS_add_rule, ruleset, 1, ctypes.byref(PathBeneath(rights, fd)), 0) == 0
        os.close(fd)
        if not ok:
            return False
    done = libc.syscall(SYS_restrict, ruleset, 0) == 0
    os.close(ruleset)
    if done:
        isolation.append(f"landlock-abi{abi}")
    return done and abi >= 4


def seccomp(isolation: list[str]) -> None:
    """A BPF filter: AF_UNIX socket() fails with EPERM (Landlock cannot stop a connect to a socket file), and so
    does socketpair() unless stream-like (a datagram pair could be re-connected to a socket file; asyncio's
    stream pair keeps working); so do ptrace and friends and io_uring; a syscall from another ABI (x32, or
    int 0x80 on x86-64) kills the process."""
    if os.uname().machine not in SECCOMP_ARCHES:
        return
    arch, refused, socket_nr, socketpair_nr = SECCOMP_ARCHES[os.uname().machine]
    # BPF_LD|W|ABS, BPF_ALU|AND|K, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K; (code, jump if true, if false, k)
    LOAD, AND, JEQ, JGE, RET = 0x20, 0x54, 0x15, 0x35, 0x06
    ALLOW, DENY, KILL = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # SECCOMP_RET_ALLOW, ERRNO(EPERM), KILL_PROCESS
    NR, ARCH, ARG0, ARG1 = 0, 4, 16, 24  # offsets in struct seccomp_data (low 32 bits of each argument)
    AF_UNIX, SOCK_STREAM, SOCK_SEQPACKET, X32_BIT = 1, 1, 5, 0x40000000
    program = [(LOAD, 0, 0, ARCH), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LOAD, 0, 0, NR)]
    if arch == 0xC000003E:
        program += [(JGE, 0, 1, X32_BIT), (RET, 0, 0, KILL)]
    for number in refused:
        program += [(JEQ, 0, 1, number), (RET, 0, 0, DENY)]
    program += [(JEQ, 0, 4, socket_nr), (LOAD, 0, 0, ARG0), (JEQ, 0, 1, AF_UNIX), (RET, 0, 0, DENY),
                (RET, 0, 0, ALLOW)]
    program += [(JEQ, 0, 8, socketpair_nr), (LOAD, 0, 0, ARG0), (JEQ, 0, 5, AF_UNIX), (LOAD, 0, 0, ARG1),
                (AND, 0, 0, 0xF), (JEQ, 2, 0, SOCK_STREAM), (JEQ, 1, 0, SOCK_SEQPACKET), (RET, 0, 0, DENY),
                (RET, 0, 0, ALLOW)]  # the type's low bits; SOCK_NONBLOCK and SOCK_CLOEXEC sit above them
    program.append((RET, 0, 0, ALLOW))

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*[Filter(*insn) for insn in program])
    if libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(Program(len(program), filters)), 0, 0) == 0:  # MODE_FILTER
        isolation.append("seccomp")


def remove_escape_hatches(network_blocked: bool) -> None:
    """Speed bumps, not walls: code can dig ctypes back out of memory. os.fork stays: the process limit and the
    PID namespace contain it, and tests exercise exactly that."""
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


def run_program(source: str, sentinel: bytes) -> None:
    """Run program.py as __main__; write `<sentinel> ok` only when its last line has run (an exit, a kill or an
    uncaught exception skips it), or `<sentinel> MemoryError` when it ended on one."""
    def finish(outcome: bytes) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        try:
            os.write(1, b"\n" + sentinel + b" " + outcome + b"\n")
        except OSError:
            pass

    main = types.ModuleType("__main__")
    main.__file__ = "program.py"
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    code = compile(source, "program.py", "exec")
    try:
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as error:
        if isinstance(error, MemoryError):
            finish(b"MemoryError")
        error = error.with_traceback(error.__traceback__.tb_next)  # the program's frames, not ours
        sys.excepthook(type(error), error, error.__traceback__)
        sys.exit(1)
    finish(b"ok")


def join_memory_cgroup(config: dict, isolation: list[str]) -> int:
    """Join the run's memory cgroup, if the harness made one; returns how many processes the program may have."""
    if config["cgroup_procs"]:
        try:
            write_file(config["cgroup_procs"], str(os.getpid()))
            isolation.append("memcg")
            return config["limits"]["max_processes"]
        except OSError:
            pass
    return config["processes_without_cgroup"]


def relay_exit_status(child: int, report_fd: int) -> None:
    """The relay, outside the namespace: pass on the exit status. Its death kills PID 1, and so the namespace."""
    for fd in (report_fd, 1, 2):  # only the program's copies then keep the harness's pipes open
        os.close(fd)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)  # killed by signal n: 128 + n, as a shell reports it


def drop_privileges(config: dict, source: str, has_groups: bool, isolation: list[str]) -> None:
    """Root: become the run's own uid with no groups. Otherwise: drop the user namespace's capabilities (its
    supplementary groups, if any, cannot be dropped: see nanochat.execution)."""
    if os.geteuid() == 0:
        preload_imports(source)
        uid = config["sandbox_uid"]
        os.chown(".", uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        isolation += ["uid", "nogroups"]
        die_with_parent(None if "pidns" in isolation else config["harness_pid"])
        return
    if drop_capabilities():
        isolation.append("nocaps")
    if not has_groups:
        isolation.append("nogroups")


def main() -> None:
    config = json.loads(sys.argv[3])
    with os.fdopen(config["sentinel_fd"], "rb") as pipe:
        sentinel = pipe.read()
    workdir, limits, report_fd = config["workdir"], config["limits"], config["report_fd"]
    die_with_parent(config["harness_pid"])
    isolation = []
    processes = join_memory_cgroup(config, isolation)
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    root = os.geteuid() == 0
    has_groups = bool(set(os.getgroups()) - {os.getgid()})  # before a user namespace shows them as nobody's
    if enter_namespaces():
        isolation += ["pidns", "netns"]
        child = os.fork()
        if child:
            relay_exit_status(child, report_fd)
        die_with_parent(None)
        mount_private_views(workdir, limits, config["sandbox_uid"] if root else os.getuid(), isolation)
        if "tmpfs" in isolation:
            write_file("program.py", source)  # the tmpfs hides the harness's copy; tracebacks read this one
    set_rlimits(limits, processes, relay_counts=not root and "pidns" in isolation)
    drop_privileges(config, source, has_groups, isolation)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    network_blocked = landlock(workdir, isolation) or "netns" in isolation
    seccomp(isolation)
    with os.fdopen(report_fd, "w") as report:
        report.write(json.dumps(isolation))
    remove_escape_hatches(network_blocked)
    run_program(source, sentinel)


if __name__ == "__main__":
    main()
