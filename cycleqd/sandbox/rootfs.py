"""The file system a bwrap sandbox sees: an Ubuntu-like layout, writable, on a capped tmpfs.

Read-only from the host: the program folders of /usr (bin, sbin, lib*, libexec, share,
include, games, src) and the merged-/usr links /bin, /lib... Nothing else of the host is
visible: no /root, /home, /work, /proc of the host, /sys, /run, /var, no project folder.

Writable and private to the session (a tmpfs that disappears with it): /, /usr itself and
/usr/local (so that tasks may create /usr/stock.log or /usr/local/bin/calc), /etc, /root,
/home, /tmp, /var, /opt, /srv, /mnt, /media, /work.

/etc is synthesised: an Ubuntu 22.04 base set of users and groups (no host accounts, a
shadow file without passwords) plus a whitelist of harmless, world-readable host
configuration that the tools need (the dynamic loader cache, alternatives for awk, PAM for
su/runuser, login.defs and /etc/default/useradd for useradd, skel, profile, terminfo...).
"""

from __future__ import annotations

import base64
import functools
import os
import stat
from pathlib import Path

Entry = tuple[str, str, int, str, int, int]  # path, kind d|f|l, mode, payload, uid, gid

USR_DIRS = (
    "bin",
    "sbin",
    "lib",
    "lib32",
    "lib64",
    "libx32",
    "libexec",
    "share",
    "include",
    "games",
    "src",
)
TOP_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
USR_LOCAL = ("bin", "etc", "games", "include", "lib", "man", "sbin", "share", "src")

# Host /etc entries copied into the sandbox (only world-readable files, no secrets).
ETC_WHITELIST = (
    "adduser.conf",
    "alternatives",
    "bash.bashrc",
    "debian_version",
    "default/locale",
    "default/nss",
    "default/useradd",
    "deluser.conf",
    "gai.conf",
    "host.conf",
    "inputrc",
    "issue",
    "issue.net",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "locale.gen",
    "localtime",
    "login.defs",
    "magic",
    "magic.mime",
    "mime.types",
    "networks",
    "nsswitch.conf",
    "os-release",
    "pam.conf",
    "pam.d",
    "profile",
    "profile.d",
    "protocols",
    "python3",
    "rpc",
    "security",
    "services",
    "shells",
    "skel",
    "terminfo",
    "timezone",
    "xattr.conf",
)
ETC_GLOBS = ("python3.*",)
MAX_ETC_FILE = 4 << 20

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
bin:x:2:2:bin:/bin:/usr/sbin/nologin
sys:x:3:3:sys:/dev:/usr/sbin/nologin
sync:x:4:65534:sync:/bin:/bin/sync
games:x:5:60:games:/usr/games:/usr/sbin/nologin
man:x:6:12:man:/var/cache/man:/usr/sbin/nologin
lp:x:7:7:lp:/var/spool/lpd:/usr/sbin/nologin
mail:x:8:8:mail:/var/mail:/usr/sbin/nologin
news:x:9:9:news:/var/spool/news:/usr/sbin/nologin
uucp:x:10:10:uucp:/var/spool/uucp:/usr/sbin/nologin
proxy:x:13:13:proxy:/bin:/usr/sbin/nologin
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
backup:x:34:34:backup:/var/backups:/usr/sbin/nologin
list:x:38:38:Mailing List Manager:/var/list:/usr/sbin/nologin
irc:x:39:39:ircd:/run/ircd:/usr/sbin/nologin
gnats:x:41:41:Gnats Bug-Reporting System (admin):/var/lib/gnats:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
_apt:x:100:65534::/nonexistent:/usr/sbin/nologin
"""
GROUPS = """\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
news:x:9:
uucp:x:10:
man:x:12:
proxy:x:13:
kmem:x:15:
dialout:x:20:
fax:x:21:
voice:x:22:
cdrom:x:24:
floppy:x:25:
tape:x:26:
sudo:x:27:
audio:x:29:
dip:x:30:
www-data:x:33:
backup:x:34:
operator:x:37:
list:x:38:
irc:x:39:
src:x:40:
gnats:x:41:
shadow:x:42:
utmp:x:43:
video:x:44:
sasl:x:45:
plugdev:x:46:
staff:x:50:
games:x:60:
users:x:100:
nogroup:x:65534:
"""


_DPKG_LOG = (
    "2024-01-01 00:00:00 startup archives install\n"
    "2024-01-01 00:00:00 install base-files:amd64 <none> 12ubuntu4\n"
    "2024-01-01 00:00:00 status installed base-files:amd64 12ubuntu4\n"
)
_ALTERNATIVES_LOG = (
    "update-alternatives 2024-01-01 00:00:00: run with --install /usr/bin/awk awk /usr/bin/mawk 5\n"
)
_APT_HISTORY = (
    "\nStart-Date: 2024-01-01  00:00:00\nCommandline: apt-get install -y python3\n"
    "End-Date: 2024-01-01  00:00:01\n"
)


def _shadow(passwd: str) -> str:
    return "".join(f"{line.split(':')[0]}:*:19000:0:99999:7:::\n" for line in passwd.splitlines())


def _gshadow(groups: str) -> str:
    return "".join(f"{line.split(':')[0]}:*::\n" for line in groups.splitlines())


def _file(path: str, text: str | bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    data = text.encode() if isinstance(text, str) else text
    return (path, "f", mode, base64.b64encode(data).decode(), uid, gid)


def _dir(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return (path, "d", mode, "", uid, gid)


def _link(path: str, target: str) -> Entry:
    return (path, "l", 0o777, target, 0, 0)


@functools.lru_cache(maxsize=4)
def host_etc(etc: str = "/etc") -> tuple[Entry, ...]:
    """The whitelisted, world-readable part of the host's /etc as entries."""
    out: list[Entry] = []
    base = Path(etc)
    names = list(ETC_WHITELIST)
    for pattern in ETC_GLOBS:
        names += sorted(p.name for p in base.glob(pattern))
    made_dirs: set[str] = set()

    def parent_dirs(rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made_dirs:
                made_dirs.add(d)
                out.append(_dir(f"/etc/{d}"))

    def add(path: Path) -> None:
        rel = path.relative_to(base).as_posix()
        try:
            st = path.lstat()
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            parent_dirs(rel)
            out.append(_link(f"/etc/{rel}", os.readlink(path)))
        elif stat.S_ISDIR(st.st_mode):
            if not st.st_mode & stat.S_IROTH:
                return
            parent_dirs(rel + "/x")
            for child in sorted(path.iterdir()):
                add(child)
        elif stat.S_ISREG(st.st_mode):
            if not st.st_mode & stat.S_IROTH or st.st_size > MAX_ETC_FILE:
                return
            try:
                data = path.read_bytes()
            except OSError:
                return
            parent_dirs(rel)
            out.append(_file(f"/etc/{rel}", data, stat.S_IMODE(st.st_mode)))

    for name in names:
        add(base / name)
    return tuple(out)


@functools.lru_cache(maxsize=4)
def usr_layout(root: str = "/") -> tuple[tuple[str, ...], tuple[Entry, ...]]:
    """(host folders to bind read-only, link entries) for /usr and the merged-/usr links."""
    binds: list[str] = []
    links: list[Entry] = []
    for name in USR_DIRS:
        path = os.path.join(root, "usr", name)
        if os.path.islink(path):
            links.append(_link(f"/usr/{name}", os.readlink(path)))
        elif os.path.isdir(path):
            binds.append(f"/usr/{name}")
    for name in TOP_LINKS:
        path = os.path.join(root, name)
        if os.path.islink(path):
            links.append(_link(f"/{name}", os.readlink(path)))
        elif os.path.isdir(path):
            binds.append(f"/{name}")
    return tuple(binds), tuple(links)


@functools.lru_cache(maxsize=4)
def unreadable_dirs(root: str = "/") -> tuple[str, ...]:
    """Folders under the read-only binds that sandbox root could not open (host-root-only
    modes such as polkit's rules.d): masked with an empty read-only tmpfs, so that a
    `find /` in the sandbox runs without "Permission denied" noise, as it would as real root.
    """
    binds, _ = usr_layout(root)
    out: list[str] = []
    for top in binds:
        for dirpath, dirnames, _files in os.walk(os.path.join(root, top.lstrip("/"))):
            keep = []
            for name in dirnames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode) and (st.st_mode & 0o005) != 0o005:
                    out.append("/" + os.path.relpath(path, root))
                else:
                    keep.append(name)
            dirnames[:] = keep
    return tuple(sorted(out))


def build_entries(
    *, sandbox_uid: int, with_sandbox_user: bool, cwd: str, root: str = "/"
) -> list[Entry]:
    """Everything written into the session's tmpfs before bwrap starts. `root` is where the
    programs come from: the host (/) or an unpacked distribution tree (its usr/ and etc/)."""
    binds, links = usr_layout(root)
    passwd, groups = PASSWD, GROUPS
    if with_sandbox_user:
        passwd += f"sandbox:x:{sandbox_uid}:{sandbox_uid}:sandbox:/work:/bin/bash\n"
        groups += f"sandbox:x:{sandbox_uid}:\n"
    entries: list[Entry] = [
        _dir("/usr"),
        *(_dir(f"/usr/local/{d}") for d in USR_LOCAL),
        *(_dir(b) for b in binds),
        *links,
        _dir("/etc"),
        *host_etc(os.path.join(root, "etc")),
        _file("/etc/passwd", passwd),
        _file("/etc/group", groups),
        _file("/etc/shadow", _shadow(passwd), 0o640, 0, 42),
        _file("/etc/gshadow", _gshadow(groups), 0o640, 0, 42),
        _file("/etc/hostname", "sandbox\n"),
        _file("/etc/hosts", "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost\n"),
        _file("/etc/resolv.conf", "# no network in the sandbox\n"),
        _file("/etc/environment", ""),
        _file("/etc/fstab", "# UNCONFIGURED FSTAB\n"),
        _file("/etc/machine-id", "0" * 32 + "\n", 0o444),
        _file("/etc/subuid", ""),
        _file("/etc/subgid", ""),
        _link("/etc/mtab", "../proc/self/mounts"),
        _dir("/root", 0o700),
        _dir("/home"),
        _dir("/tmp", 0o1777),
        _dir("/var"),
        *(_dir(f"/var/{d}") for d in ("backups", "cache", "lib", "local", "log", "mail", "opt")),
        _dir("/var/spool"),
        _dir("/var/tmp", 0o1777),
        _link("/var/run", "/run"),
        _link("/var/lock", "/run/lock"),
        _dir("/run"),
        _dir("/run/lock", 0o1777),
        _dir("/opt"),
        _dir("/srv"),
        _dir("/mnt"),
        _dir("/media"),
        _dir("/boot"),
        _dir("/proc", 0o555),
        _dir("/dev"),
    ]
    # a lived-in /var/log, as in a fresh Ubuntu image (tasks sum up its files' sizes)
    entries += [
        _dir("/var/log/apt"),
        _file("/var/log/dpkg.log", _DPKG_LOG),
        _file("/var/log/alternatives.log", _ALTERNATIVES_LOG),
        _file("/var/log/bootstrap.log", "Selecting previously unselected package base-files.\n"),
        _file("/var/log/apt/history.log", _APT_HISTORY),
        _file("/var/log/apt/term.log", "Log started: 2024-01-01  00:00:00\n"),
        _file("/var/log/lastlog", b"", 0o664, 0, 43),
        _file("/var/log/faillog", b"", 0o644),
        _file("/var/log/wtmp", b"", 0o664, 0, 43),
        _file("/var/log/btmp", b"", 0o660, 0, 43),
    ]
    # /root gets the usual dot files of a fresh Ubuntu image
    for name in (".bashrc", ".profile"):
        skel = Path(root, "etc/skel", name)
        if skel.is_file() and os.access(skel, os.R_OK):
            entries.append(_file(f"/root/{name}", skel.read_bytes()))
    work_owner = sandbox_uid if with_sandbox_user else 0
    if cwd != "/":
        parts = [p for p in cwd.split("/") if p]
        for i in range(1, len(parts)):
            entries.append(_dir("/" + "/".join(parts[:i])))
        entries.append(_dir(cwd, 0o755, work_owner, work_owner))
    return _dedupe(entries)


def _dedupe(entries: list[Entry]) -> list[Entry]:
    seen: dict[str, int] = {}
    out: list[Entry] = []
    for entry in entries:
        path = entry[0].rstrip("/") or "/"
        if path in seen:
            if entry[1] == "d" and out[seen[path]][1] == "d":
                out[seen[path]] = entry  # later dir wins (mode/owner)
            continue
        seen[path] = len(out)
        out.append(entry)
    return out
