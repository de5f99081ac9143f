"""Where the database skill's SQL runs: a fresh database per episode, reached by the model only
through an account that can touch nothing else, with every statement bounded in time and output.

Two backends behind one small interface (`open_sandbox(url)` -> `Sandbox.create(table)` ->
`Episode.execute(sql)` / `Episode.table_md5()` / `Episode.drop()`):

- ``mysql://user:password@host:port`` (also ``mariadb://``, ``mysql+pymysql://``): a real
  MySQL-compatible server (the paper's setting). The URL's account is the *admin*: it creates, per
  episode, a database ``cycleqd_<random>``, the sample's table, and a user ``cqd_<random>`` with a
  random password whose only rights are plain data and schema rights on that one database (no FILE,
  no SUPER, no GRANT, no routines, no other database), at most `max_user_connections` connections.
  The model's statements run as that user, one connection per statement (AgentBench reconnects
  before every statement too), with a server-side statement time limit (MariaDB
  ``max_statement_time``, MySQL ``max_execution_time``), a client-side watchdog that kills the
  connection from the admin side when the limit is bypassed (``SET STATEMENT ... FOR``), socket
  timeouts, no ``LOAD DATA LOCAL``, no multi-statement packets, and results read row by row only
  as far as the observation shows them (800 characters). Databases and users are dropped when the
  episode ends, also on errors.
- ``sqlite://``: the embedded default for tiny worlds; each episode is a fresh in-memory database
  with an authorizer (no ATTACH, no PRAGMA), a progress-handler time limit and a length limit.

Observations are what AgentBench's DBBench shows the model (its `Container.execute`, with
mysql-connector-python 8.0.32): ``str(cursor.fetchall())``, i.e. the Python repr of a list of row
tuples, ``[]`` for statements without a result set, ``"<errno> (<sqlstate>): <message>"`` for
server errors, cut at 800 characters with ``[TRUNCATED]`` appended.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

DB_PREFIX = "cycleqd_"
USER_PREFIX = "cqd_"
TRUNCATED = "[TRUNCATED]"
# What mysql-connector's C extension says when a block held more than one statement (AgentBench).
OUT_OF_SYNC = "Commands out of sync; you can't run this command now"
# MySQL 8's defaults (the AgentBench server was the `mysql` docker image); MariaDB's differ.
MYSQL8_SQL_MODE = (
    "ONLY_FULL_GROUP_BY,STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,"
    "ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"
)
MYSQL8_GROUP_CONCAT_MAX_LEN = 1024
# Rights of the per-episode account, on its own database only.
EPISODE_PRIVILEGES = (
    "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, "
    "CREATE TEMPORARY TABLES, CREATE VIEW, SHOW VIEW"
)
MultiStatements = Literal["agentbench", "first"]


class SandboxUnavailable(RuntimeError):
    """The database server named by the URL cannot be reached or used."""


@dataclass(frozen=True)
class SandboxOptions:
    statement_timeout_s: float = 5.0  # server-side limit; the watchdog kills 2 s later
    connect_timeout_s: float = 10.0
    result_chars: int = 800  # AgentBench's cut; rows are read only this far
    max_user_connections: int = 2
    # What a block with several statements does. "agentbench": run only the first, roll back its
    # data changes and show the error AgentBench shows (its server ran them all, then the client
    # failed with "Commands out of sync" and reconnected, which rolled back uncommitted changes);
    # "first": run and commit only the first and show its result.
    multi_statements: MultiStatements = "agentbench"
    # MySQL only: the session sql_mode of the model's statements (AgentBench's server: MySQL 8's
    # default, which is strict). The data's answer_md5 values were made without strict mode: two
    # reference UPDATEs reproduce them only with sql_mode="" (see the skill's docs).
    sql_mode: str = MYSQL8_SQL_MODE

    def __post_init__(self) -> None:
        for name in ("statement_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.result_chars < 1 or self.max_user_connections < 1:
            raise ValueError("result_chars and max_user_connections must be >= 1")
        if self.multi_statements not in ("agentbench", "first"):
            raise ValueError(
                f"multi_statements must be 'agentbench' or 'first', got {self.multi_statements!r}"
            )
        if not re.fullmatch(r"[A-Za-z_,]*", self.sql_mode):
            raise ValueError(f"sql_mode: comma-separated mode names only, got {self.sql_mode!r}")


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


class Episode(Protocol):
    def execute(self, sql: str) -> str:
        """Run the model's SQL; return the observation text. Never raises for bad SQL."""
        ...

    def table_md5(self) -> str:
        """AgentBench's table hash, as the text its `execute` returns (e.g. "[('ab..',)]")."""
        ...

    def drop(self) -> None: ...


class Sandbox(Protocol):
    kind: str

    def create(self, table: TableSpec) -> tuple[Episode, list[str]]:
        """A fresh database holding `table`; also the setup errors that AgentBench tolerates
        (a CREATE TABLE or INSERT that fails leaves the episode with no or an empty table)."""
        ...

    def close(self) -> None: ...


def open_sandbox(url: str, options: SandboxOptions | None = None) -> Sandbox:
    options = options or SandboxOptions()
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("mysql", "mariadb", "mysql+pymysql", "mariadb+pymysql"):
        return MySQLSandbox(url, options)
    if scheme == "sqlite":
        return SQLiteSandbox(url, options)
    raise ValueError(
        f"database url {url!r}: use mysql://user[:password]@host[:port] (MySQL or MariaDB) "
        "or sqlite:// (in-memory, one database per episode)"
    )


# --------------------------------------------------------------------------- SQL text helpers


def split_first_statement(sql: str) -> tuple[str, str]:
    """(first statement, the rest after its `;`), skipping quotes, backticks and comments as the
    MySQL parser does (backslash escapes in strings, ``--`` needs a following blank)."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            i += 1
            while i < n:
                if c != "`" and sql[i] == "\\":
                    i += 2
                    continue
                if sql[i] == c:
                    if i + 1 < n and sql[i + 1] == c:  # doubled quote
                        i += 2
                        continue
                    break
                i += 1
            i += 1
        elif c == "#" or (sql.startswith("--", i) and (i + 2 == n or sql[i + 2] in " \t\r\n\f\v")):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == ";":
            return sql[:i], sql[i + 1 :]
        else:
            i += 1
    return sql, ""


def read_rows(cursor: Any, limit: int) -> tuple[str, bool]:
    """``str(cursor.fetchall())`` cut at `limit` characters (+ "[TRUNCATED]"), reading rows only
    as far as needed. Returns (text, whether the result set was read to its end)."""
    parts = ["["]
    length = 1
    while True:
        row = cursor.fetchone()
        if row is None:
            return "".join(parts) + "]", True
        if len(parts) > 1:
            parts.append(", ")
            length += 2
        text = repr(tuple(row))
        parts.append(text)
        length += len(text)
        if length >= limit:
            # The full text is longer than `limit` and begins with these `limit` characters.
            return "".join(parts)[:limit] + TRUNCATED, cursor.fetchone() is None


def agentbench_md5_of_rows(rows: Sequence[Sequence[Any]]) -> str:
    """AgentBench's table hash computed in Python (the SQL is
    ``select md5(group_concat(rowhash order by rowhash)) from (select
    substring(md5(concat_ws(',', cols...)), 1, 5) as rowhash from t)``, with MySQL's default
    group_concat_max_len of 1024), rendered as its `execute` renders the result."""
    hashes = sorted(
        hashlib.md5(",".join(str(v) for v in row if v is not None).encode()).hexdigest()[:5]
        for row in rows
    )
    if not hashes:
        return "[(None,)]"
    joined = ",".join(hashes)[:MYSQL8_GROUP_CONCAT_MAX_LEN]
    return str([(hashlib.md5(joined.encode()).hexdigest(),)])


def md5_query(table: str, columns: Sequence[str]) -> str:
    cols = ",".join(quote_ident(c) for c in columns)
    return (
        "select md5(group_concat(rowhash order by rowhash)) as hash "
        f"from( SELECT substring(MD5(CONCAT_WS(',', {cols})), 1, 5) AS rowhash "
        f"FROM {quote_ident(table)}) as sub;"
    )


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _db_value(v: Any) -> str | None:
    # AgentBench inserts every value as the quoted string str(v) into TEXT columns.
    return None if v is None else str(v)


# ----------------------------------------------------------------------------------- MySQL

# SQLSTATEs of the server errors a model meets most (PyMySQL drops the SQLSTATE that
# mysql-connector prints); anything else shows HY000, the generic one.
_SQLSTATE = {
    1044: "42000", 1045: "28000", 1046: "3D000", 1048: "23000", 1049: "42000", 1050: "42S01",
    1051: "42S02", 1052: "23000", 1054: "42S22", 1055: "42000", 1058: "21S01", 1060: "42S21",
    1062: "23000", 1064: "42000", 1065: "42000", 1066: "42000", 1136: "21S01", 1140: "42000",
    1142: "42000", 1143: "42000", 1146: "42S02", 1149: "42000", 1227: "42000", 1235: "42000",
    1241: "21000", 1242: "21000", 1248: "42000", 1264: "22003", 1292: "22007", 1305: "42000",
    1317: "70100", 1365: "22012", 1406: "22001", 1410: "42000", 1969: "70100",
}  # fmt: skip
TIMEOUT_MESSAGE = (
    "3024 (HY000): Query execution was interrupted, maximum statement execution time exceeded"
)


def _format_mysql_error(exc: BaseException) -> str:
    args = getattr(exc, "args", ())
    if len(args) >= 2 and isinstance(args[0], int):
        return f"{args[0]} ({_SQLSTATE.get(args[0], 'HY000')}): {args[1]}"
    return str(exc)


def _is_client_error(exc: BaseException) -> bool:
    """Client-side errors (codes 2000 and up: lost connection, cannot connect, timeouts)."""
    args = getattr(exc, "args", ())
    return not (args and isinstance(args[0], int) and args[0] < 2000)


def _parse_mysql_url(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"database url {url!r} names no host: mysql://user@host:port")
    return {
        "host": parts.hostname,
        "port": parts.port or 3306,
        "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or ""),
    }


def _abandon_unbuffered(cursor: Any) -> None:
    """Make PyMySQL forget an unbuffered result so that closing the connection does not read the
    rest of it (it would block on a killed or endless result)."""
    with contextlib.suppress(Exception):
        result = cursor._result
        if result is not None:
            result.unbuffered_active = False
        cursor._result = None
        cursor.connection = None


class MySQLSandbox:
    kind = "mysql"

    def __init__(self, url: str, options: SandboxOptions) -> None:
        try:
            import pymysql
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SandboxUnavailable(
                "the database skill needs PyMySQL for mysql:// urls: pip install pymysql"
            ) from exc
        self._pymysql = pymysql
        self.options = options
        self._server = _parse_mysql_url(url)
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue()
        try:
            with self.admin() as cur:
                cur.execute("SELECT VERSION(), USER()")
                version, who = cur.fetchone()
        except pymysql.MySQLError as exc:
            safe = f"{self._server['user']}@{self._server['host']}:{self._server['port']}"
            raise SandboxUnavailable(
                f"cannot use the MySQL/MariaDB server at {safe}: {exc}. Start one (e.g. "
                "mariadbd) or point the skill's url at one whose account may create databases "
                "and users"
            ) from exc
        self.mariadb = "mariadb" in str(version).lower()
        # The host the server sees us as: the episode users are created for exactly that host,
        # so no anonymous ''@host account can shadow them and they cannot log in from elsewhere.
        self.client_host = str(who).rsplit("@", 1)[-1] or "%"

    # -- admin connections (one per worker thread at a time)
    def _connect_admin(self) -> Any:
        return self._pymysql.connect(
            **self._server,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=self.options.connect_timeout_s,
            read_timeout=60,
            write_timeout=60,
            local_infile=False,
            init_command=f"SET SESSION group_concat_max_len = {MYSQL8_GROUP_CONCAT_MAX_LEN}",
        )

    @contextlib.contextmanager
    def admin(self) -> Iterator[Any]:
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect_admin()
        try:
            with conn.cursor() as cur:
                yield cur
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        else:
            self._pool.put(conn)

    def kill(self, thread_id: int) -> None:
        conn = None
        try:
            conn = self._connect_admin()
            with conn.cursor() as cur:
                cur.execute(f"KILL {int(thread_id)}")
        except Exception:  # already gone
            pass
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def create(self, table: TableSpec) -> tuple[MySQLEpisode, list[str]]:
        token = secrets.token_hex(8)
        db, user, password = DB_PREFIX + token, USER_PREFIX + token, secrets.token_urlsafe(24)
        host = self.client_host
        warnings: list[str] = []
        resources = f"MAX_USER_CONNECTIONS {int(self.options.max_user_connections)}"
        if self.mariadb:
            resources += f" MAX_STATEMENT_TIME {float(self.options.statement_timeout_s)}"
        episode = MySQLEpisode(self, db, user, password, table)
        pymysql = self._pymysql
        try:
            with self.admin() as cur:
                cur.execute(f"CREATE DATABASE {quote_ident(db)} CHARACTER SET utf8mb4")
                cur.execute(
                    f"CREATE USER %s@%s IDENTIFIED BY %s WITH {resources}", (user, host, password)
                )
                # `_` is a wildcard in GRANT's database name: escape it.
                grant_db = quote_ident(db.replace("_", "\\_"))
                cur.execute(f"GRANT {EPISODE_PRIVILEGES} ON {grant_db}.* TO %s@%s", (user, host))
                target = f"{quote_ident(db)}.{quote_ident(table.name)}"
                cols = ",".join(f"{quote_ident(c)} TEXT" for c in table.columns)
                try:
                    cur.execute(f"CREATE TABLE {target} ({cols})")
                    if table.rows:
                        names = ",".join(quote_ident(c) for c in table.columns)
                        marks = ",".join(
                            "(" + ",".join(["%s"] * len(row)) + ")" for row in table.rows
                        )
                        params = [_db_value(v) for row in table.rows for v in row]
                        head = f"INSERT INTO {target} ({names}) VALUES ".replace("%", "%%")
                        cur.execute(head + marks, params)
                except pymysql.MySQLError as exc:
                    if _is_client_error(exc):
                        raise
                    warnings.append(_format_mysql_error(exc))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                episode.drop()
            if isinstance(exc, pymysql.MySQLError):
                raise SandboxUnavailable(f"cannot set up an episode's database: {exc}") from exc
            raise
        return episode, warnings

    def close(self) -> None:
        while True:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()


class MySQLEpisode:
    def __init__(
        self, sandbox: MySQLSandbox, db: str, user: str, password: str, table: TableSpec
    ) -> None:
        self.sandbox, self.db, self.user, self._password, self.table = (
            sandbox,
            db,
            user,
            password,
            table,
        )
        self.dropped = False

    def _connect(self) -> Any:
        s = self.sandbox
        t = s.options.statement_timeout_s
        if s.mariadb:
            limit = f"max_statement_time = {t}"
        else:
            limit = f"max_execution_time = {int(t * 1000)}"
        return s._pymysql.connect(
            host=s._server["host"],
            port=s._server["port"],
            user=self.user,
            password=self._password,
            database=self.db,
            charset="utf8mb4",
            autocommit=False,
            connect_timeout=s.options.connect_timeout_s,
            read_timeout=t + 10,
            write_timeout=t + 10,
            local_infile=False,
            init_command=(
                f"SET SESSION sql_mode = '{s.options.sql_mode}', "
                f"group_concat_max_len = {MYSQL8_GROUP_CONCAT_MAX_LEN}, {limit}"
            ),
        )

    def execute(self, sql: str) -> str:
        pymysql = self.sandbox._pymysql
        options = self.sandbox.options
        if not sql.strip():
            return "[]"
        first, rest = split_first_statement(sql)
        multi = bool(rest.strip())
        if multi and options.multi_statements == "agentbench" and not first.strip():
            return "1065 (42000): Query was empty"
        if not first.strip():
            return "[]"
        try:
            conn = self._connect()
        except pymysql.MySQLError as exc:
            if _is_client_error(exc):  # the server is gone: not the model's doing
                raise SandboxUnavailable(f"lost the database server: {exc}") from exc
            return _format_mysql_error(exc)  # e.g. too many connections for this account
        fired = threading.Event()

        def watchdog() -> None:
            fired.set()
            self.sandbox.kill(conn.thread_id())

        timer = threading.Timer(options.statement_timeout_s + 2.0, watchdog)
        timer.daemon = True
        timer.start()
        server_idle = False  # whether the server has finished with this connection's statement
        cur = conn.cursor(pymysql.cursors.SSCursor)
        try:
            cur.execute(first)
            if cur.description is None:
                text, server_idle = "[]", True
            else:
                text, server_idle = read_rows(cur, options.result_chars)
            agentbench_multi = multi and options.multi_statements == "agentbench"
            if server_idle:
                cur.close()
                if agentbench_multi:
                    conn.rollback()
                else:
                    conn.commit()
            return OUT_OF_SYNC if agentbench_multi else text
        except Exception as exc:
            if fired.is_set():
                return TIMEOUT_MESSAGE
            server_idle = not _is_client_error(exc)  # a server error ends the statement
            return _format_mysql_error(exc)
        finally:
            timer.cancel()
            if not server_idle:
                # Rows left unread or the client gave up: stop the server-side work instead of
                # draining it (closing without a commit rolls back).
                if not fired.is_set():
                    self.sandbox.kill(conn.thread_id())
                _abandon_unbuffered(cur)
            with contextlib.suppress(Exception):
                conn.close()

    def table_md5(self) -> str:
        pymysql = self.sandbox._pymysql
        query = md5_query(self.table.name, self.table.columns)
        try:
            with self.sandbox.admin() as cur:
                cur.execute(f"USE {quote_ident(self.db)}")
                cur.execute(query)
                return str(list(cur.fetchall()))
        except pymysql.MySQLError as exc:
            if _is_client_error(exc):
                raise SandboxUnavailable(f"lost the database server: {exc}") from exc
            return _format_mysql_error(exc)  # e.g. the model dropped the table

    def drop(self) -> None:
        if self.dropped:
            return
        host = self.sandbox.client_host
        with self.sandbox.admin() as cur:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (self.user,)
            )
            for (thread_id,) in cur.fetchall():
                with contextlib.suppress(Exception):
                    cur.execute(f"KILL {int(thread_id)}")
            cur.execute("DROP USER IF EXISTS %s@%s", (self.user, host))
            cur.execute(f"DROP DATABASE IF EXISTS {quote_ident(self.db)}")
        self.dropped = True


# ---------------------------------------------------------------------------------- SQLite

_SQLITE_ALLOWED = {
    getattr(sqlite3, name)
    for name in (
        "SQLITE_SELECT", "SQLITE_READ", "SQLITE_INSERT", "SQLITE_UPDATE", "SQLITE_DELETE",
        "SQLITE_CREATE_TABLE", "SQLITE_CREATE_INDEX", "SQLITE_CREATE_VIEW",
        "SQLITE_CREATE_TEMP_TABLE", "SQLITE_CREATE_TEMP_INDEX", "SQLITE_CREATE_TEMP_VIEW",
        "SQLITE_DROP_TABLE", "SQLITE_DROP_INDEX", "SQLITE_DROP_VIEW", "SQLITE_DROP_TEMP_TABLE",
        "SQLITE_DROP_TEMP_INDEX", "SQLITE_DROP_TEMP_VIEW", "SQLITE_ALTER_TABLE",
        "SQLITE_TRANSACTION", "SQLITE_SAVEPOINT", "SQLITE_FUNCTION", "SQLITE_RECURSIVE",
    )
    if hasattr(sqlite3, name)
}  # fmt: skip
_SQLITE_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "fts3_tokenizer"}


def _sqlite_authorizer(action: int, arg1: Any, arg2: Any, dbname: Any, source: Any) -> int:
    if action not in _SQLITE_ALLOWED:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in _SQLITE_DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    if dbname not in (None, "main", "temp"):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class SQLiteSandbox:
    kind = "sqlite"

    def __init__(self, url: str, options: SandboxOptions) -> None:
        parts = urlsplit(url)
        if parts.netloc or parts.path not in ("", "/", "/:memory:"):
            raise ValueError(f"database url {url!r}: only sqlite:// (in memory) is supported")
        self.options = options

    def create(self, table: TableSpec) -> tuple[SQLiteEpisode, list[str]]:
        conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        warnings: list[str] = []
        target = quote_ident(table.name)
        try:
            cols = ",".join(f"{quote_ident(c)} TEXT" for c in table.columns)
            conn.execute(f"CREATE TABLE {target} ({cols})")
            if table.rows:
                if any(len(row) != len(table.columns) for row in table.rows):
                    raise sqlite3.OperationalError("Column count doesn't match value count")
                marks = ",".join("?" * len(table.columns))
                conn.executemany(
                    f"INSERT INTO {target} VALUES ({marks})",
                    [[_db_value(v) for v in row] for row in table.rows],
                )
        except sqlite3.Error as exc:
            warnings.append(str(exc))
        conn.set_authorizer(_sqlite_authorizer)
        for name, value in (("SQLITE_LIMIT_ATTACHED", 0), ("SQLITE_LIMIT_LENGTH", 1_000_000)):
            if hasattr(sqlite3, name):
                conn.setlimit(getattr(sqlite3, name), value)
        return SQLiteEpisode(conn, table, self.options), warnings

    def close(self) -> None:
        pass


class SQLiteEpisode:
    def __init__(self, conn: sqlite3.Connection, table: TableSpec, options: SandboxOptions) -> None:
        self.conn, self.table, self.options = conn, table, options
        self.dropped = False
        self._lock = threading.Lock()

    def execute(self, sql: str) -> str:
        if not sql.strip():
            return "[]"
        first, rest = split_first_statement(sql)
        multi = bool(rest.strip())
        if not first.strip():
            return "Query was empty" if multi else "[]"
        deadline = time.monotonic() + self.options.statement_timeout_s
        with self._lock:
            self.conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
            cur = self.conn.cursor()
            try:
                cur.execute("BEGIN")
                cur.execute(first)
                if cur.description is None:
                    text = "[]"
                else:
                    text, _ = read_rows(cur, self.options.result_chars)
                if multi and self.options.multi_statements == "agentbench":
                    self.conn.execute("ROLLBACK")
                    return OUT_OF_SYNC
                self.conn.execute("COMMIT")
                return text
            except Exception as exc:
                with contextlib.suppress(Exception):
                    self.conn.execute("ROLLBACK")
                if time.monotonic() > deadline:
                    return TIMEOUT_MESSAGE
                return str(exc)
            finally:
                self.conn.set_progress_handler(None, 0)
                cur.close()

    def table_md5(self) -> str:
        cols = ",".join(quote_ident(c) for c in self.table.columns)
        with self._lock:
            try:
                rows = self.conn.execute(f"SELECT {cols} FROM {quote_ident(self.table.name)}")
                return agentbench_md5_of_rows(rows.fetchall())
            except sqlite3.Error as exc:
                return str(exc)

    def drop(self) -> None:
        if not self.dropped:
            self.dropped = True
            self.conn.close()
