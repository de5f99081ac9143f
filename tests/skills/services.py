"""What the skills' tests need from this machine, and how to provide it when it is missing:
the MySQL-compatible server of the `db` skill and the bubblewrap sandbox."""

from __future__ import annotations

import os

MYSQL_URL = os.environ.get("CYCLEQD_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306")
HOW_TO_MYSQL = (
    "needs a MySQL/MariaDB server whose account may create databases and users: start one "
    "(e.g. `mariadbd` or `docker run -e MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1 -p 3306:3306 "
    "mariadb`) or set CYCLEQD_TEST_MYSQL_URL=mysql://user:password@host:port; and PyMySQL "
    "(`pip install pymysql`)"
)


def sandbox_skip(**limits) -> str | None:
    """Why the bwrap sandbox cannot run a command here with these `Limits`, or None."""
    from cycleqd.sandbox import Limits, Sandbox, SandboxError, SandboxUnavailableError
    from cycleqd.sandbox.bwrap import BwrapBackend

    reason = BwrapBackend.available()
    if reason:
        return reason
    try:
        with Sandbox.open(Limits(**limits), backend="bwrap") as s:
            s.run("true")
    except (SandboxError, SandboxUnavailableError) as exc:
        return f"the bwrap sandbox cannot start here: {exc}"
    return None
