"""Host-side launcher of a bwrap session (stdlib only; runs as `python -I -S -c <this> CONFIG`).

Steps, in a process that owns nothing else:
1. a new user namespace. Started as host root, it maps sandbox uids 0..count-1 to the
   unprivileged host range base..base+count-1 (so sandbox root is host uid `base`: not root,
   subject to RLIMIT_NPROC, owner of nothing on the host); started as any other user, it maps
   sandbox root to that user (one uid only).
2. a new mount namespace with a size-capped tmpfs: the whole writable file system of the
   session (root, /etc copy, /tmp, /work, ...). It vanishes with the namespace.
3. no further user namespaces below this one (max_user_namespaces = 0): sandboxed code can
   never gain the capabilities to mount anything.
4. exec bwrap, which adds pid, net, ipc, uts and cgroup namespaces, binds the host's /usr
   subfolders read-only and starts the agent.

Errors before bwrap runs are printed as one line on stderr, exit status 121.
"""

import base64
import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18


def fail(msg):
    sys.stderr.write(f"cycleqd-sandbox: {msg}\n")
    sys.stderr.flush()
    os._exit(121)


def libc():
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    lib.unshare.argtypes = [ctypes.c_int]
    return lib


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        fail(f"{what} failed: {os.strerror(err)} (errno {err})")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def populate(root, entries, single_uid):
    for path, kind, mode, payload, uid, gid in entries:
        if single_uid:  # only sandbox root exists in a one-uid map
            uid = gid = 0
        target = os.path.join(root, path.lstrip("/"))
        if kind == "d":
            os.makedirs(target, exist_ok=True)
            os.chmod(target, mode)
            os.chown(target, uid, gid)
        elif kind == "l":
            os.symlink(payload, target)
            os.lchown(target, uid, gid)
        elif kind == "f":
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(target, flags, 0o600)
            try:
                data = base64.b64decode(payload)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                os.fchown(fd, uid, gid)
            finally:
                os.close(fd)


def main():
    config_path = sys.argv[1]
    with open(config_path) as f:
        cfg = json.load(f)
    os.unlink(config_path)
    lib = libc()
    uid_map = cfg.get("map")  # {"base": int, "count": int} when started as host root

    if uid_map:
        # Docker-like descriptor limit (shell tasks write `echo 123321>file`): only root can
        # raise the hard limit, and only before leaving the host's user namespace.
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
        except (ImportError, OSError, ValueError):
            pass
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid:  # parent: write the child's id maps, then wait for it
            os.close(ready_w)
            os.close(go_r)
            if os.read(ready_r, 1) != b"1":
                _, status = os.waitpid(pid, 0)
                os._exit(os.waitstatus_to_exitcode(status) or 121)
            try:
                line = f"0 {uid_map['base']} {uid_map['count']}\n"
                write(f"/proc/{pid}/uid_map", line)
                write(f"/proc/{pid}/gid_map", line)
            except OSError as exc:
                os.kill(pid, 9)
                fail(f"cannot write the uid map of the sandbox: {exc}")
            os.write(go_w, b"1")
            os.close(go_w)
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        os.close(ready_r)
        os.close(go_w)
        check(lib.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        os.write(ready_w, b"1")
        if os.read(go_r, 1) != b"1":
            fail("the uid map was not written")
        os.setresgid(0, 0, 0)
        os.setgroups([])
        os.setresuid(0, 0, 0)
    else:
        uid, gid = os.getuid(), os.getgid()
        check(lib.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", f"0 {uid} 1\n")
        write("/proc/self/gid_map", f"0 {gid} 1\n")

    # No user namespaces inside the sandbox: one would let its processes mount (an unbounded
    # tmpfs, for example). The limit is per user namespace; ours is set to zero here.
    try:
        write("/proc/sys/user/max_user_namespaces", "0")
    except OSError as exc:
        fail(f"cannot forbid nested user namespaces: {exc}")
    check(lib.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(lib.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    staging = cfg["staging"].encode()
    opts = f"size={int(cfg['size'])},mode=0755".encode()
    check(lib.mount(b"tmpfs", staging, b"tmpfs", MS_NOSUID | MS_NODEV, opts), "mounting tmpfs")
    try:
        populate(cfg["staging"], cfg["entries"], not uid_map)
    except OSError as exc:
        fail(f"cannot prepare the sandbox file system: {exc}")
    argv = cfg["bwrap"]
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        fail(f"cannot run {argv[0]}: {exc}")


if __name__ == "__main__":
    main()
