"""The team stack as local processes: PostgreSQL, an S3 server, MLflow, the Prefect server and worker.

``compose.yaml`` runs these services in containers on a team's host. Where no container engine
runs (a laptop, CI, this repository's tests) this script brings up the same topology on loopback
ports. ``SERVICES`` is the one table of services, ports, commands and environment: the runner
below reads it, and ``tests/test_infra.py`` checks ``compose.yaml`` against it, so that a port or
an argument changed on one side only fails the tests.

    .venv/bin/python infra/team.py up --dir /var/tmp/sum-team      # start what is not running, wait until healthy
    .venv/bin/python infra/team.py status --dir /var/tmp/sum-team
    eval "$(.venv/bin/python infra/team.py env)"                    # point MLflow, Prefect and DVC clients at it
    .venv/bin/python infra/team.py down --dir /var/tmp/sum-team

Every service runs in its own process group with its log in ``<dir>/logs``; ``<dir>/pids.json``
records the groups, and ``down`` stops each group (PostgreSQL with a fast shutdown). PostgreSQL
comes from Debian's ``postgresql`` package (installed with apt-get when ``initdb`` is missing) and,
since it refuses to run as root, runs as the ``postgres`` user when this script runs as root.

The native credentials (``NATIVE``) are fixed throwaway values, committed on purpose: every server
listens on 127.0.0.1 only. moto's S3 server keeps objects in memory, so they last until ``down``.
A team's real secrets live in ``infra/.env`` for compose, which is never committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import http.client
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

INFRA = Path(__file__).resolve().parent
REPO = INFRA.parent
INIT_SQL = INFRA / "postgres-init.sql"
WORK_POOL = "sum-process"
REGION = "us-east-1"
PG_USER = "sum"
PG_PASSWORD = "sum-local-only"  # throwaway: the native server listens on 127.0.0.1 only

log = logging.getLogger("infra.team")


@dataclass(frozen=True)
class Site:
    """Where the services find each other. Natively everything is on loopback; in compose each
    service is reached by its name, and a value may be a compose variable filled from ``.env``."""

    host: str  # the address servers bind
    postgres: str  # user:password@host:port of the PostgreSQL server
    s3_url: str  # the S3 endpoint as services reach it
    mlflow_url: str
    prefect_url: str
    public_prefect: str  # host:port of the Prefect API as a browser reaches it (the UI calls it)
    access_key: str
    secret_key: str
    mlflow_bucket: str
    dvc_bucket: str


@dataclass(frozen=True)
class Service:
    """One service of the stack; ``name`` is its compose service name.

    Arguments:
        port: the published port, the same natively and in compose (None: publishes nothing).
        argv: the command as a template over ``Site`` fields, ``{port}`` and ``{state}`` (the
            state dir). Compose runs the same command unless ``stand_in`` says otherwise.
        env: environment templates, set identically natively and in compose.
        depends_on: services that must be healthy first (compose: ``depends_on``).
        health: the HTTP path polled until it answers (compose's healthcheck polls the same).
        stand_in: what runs natively in place of compose's image, when the commands differ.
        native_env: environment only the native process needs (paths in the state dir).
        compose_env: names of variables only the compose service sets.
        stop_signal: how ``down`` asks the process group to stop.
    """

    name: str
    port: int | None = None
    argv: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    health: str | None = None
    stand_in: str | None = None
    native_env: dict[str, str] = field(default_factory=dict)
    compose_env: tuple[str, ...] = ()
    stop_signal: str = "SIGTERM"


_TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
_S3_KEYS = {"AWS_ACCESS_KEY_ID": "{access_key}", "AWS_SECRET_ACCESS_KEY": "{secret_key}", "AWS_DEFAULT_REGION": REGION}
# what a client (a developer's shell, the worker's flow runs) needs; `team.py env` prints it
CLIENT_ENV = {
    "MLFLOW_TRACKING_URI": "{mlflow_url}",
    "PREFECT_API_URL": "{prefect_url}/api",
    "AWS_ENDPOINT_URL_S3": "{s3_url}",
    **_S3_KEYS,
}

SERVICES: tuple[Service, ...] = (
    Service(
        "postgres",
        port=15432,
        argv=(
            "postgres", "-D", "{state}/postgres/data", "-p", "{port}",
            "-c", "listen_addresses={host}", "-c", "unix_socket_directories=",
        ),
        stand_in="Debian's postgresql package, initdb'd into the state dir (compose: the postgres image); "
        "both run postgres-init.sql once on an empty data dir",
        stop_signal="SIGINT",  # fast shutdown, the postgres image's STOPSIGNAL
    ),
    Service(
        "s3",
        port=19000,
        argv=("moto_server", "-H", "{host}", "-p", "{port}"),
        health="/",
        stand_in="moto's S3 server, in memory (compose: MinIO)",
    ),
    Service(
        "s3-init",
        depends_on=("s3",),
        stand_in="a step of `up` (create_buckets) makes the buckets with boto3 (compose: a one-shot `mc mb` job)",
    ),
    Service(
        "mlflow",
        port=15000,
        argv=(
            "mlflow", "server",
            # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the team extra installs psycopg2
            "--backend-store-uri", "postgresql+psycopg2://{postgres}/mlflow",
            "--serve-artifacts", "--artifacts-destination", "s3://{mlflow_bucket}/",
            "--host", "{host}", "--port", "{port}", "--workers", "1",
        ),
        env={
            "MLFLOW_S3_ENDPOINT_URL": "{s3_url}",
            **_S3_KEYS,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **_TELEMETRY_OFF,
        },
        depends_on=("postgres", "s3-init"),
        health="/health",
        # natively MLflow's defaults (localhost hosts and origins) fit; in compose the worker sends
        # Host: mlflow:15000 and browsers reach the UI at the team's host name
        compose_env=("MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"),
    ),
    Service(
        "prefect-server",
        port=14200,
        argv=("prefect", "server", "start", "--host", "{host}", "--port", "{port}"),
        env={
            "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://{postgres}/prefect",
            "PREFECT_SERVER_UI_API_URL": "http://{public_prefect}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "true",
        },
        depends_on=("postgres",),
        health="/api/health",
        native_env={"PREFECT_HOME": "{state}/prefect"},
    ),
    Service(
        "prefect-worker",
        argv=("prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process"),
        env={**CLIENT_ENV, **_TELEMETRY_OFF},
        depends_on=("prefect-server", "mlflow"),
        native_env={"PREFECT_HOME": "{state}/prefect"},
    ),
)


def service(name: str) -> Service:
    for s in SERVICES:
        if s.name == name:
            return s
    raise KeyError(f"{name}: no such service in infra/team.py SERVICES")


NATIVE = Site(
    host="127.0.0.1",
    postgres=f"{PG_USER}:{PG_PASSWORD}@127.0.0.1:{service('postgres').port}",
    s3_url=f"http://127.0.0.1:{service('s3').port}",
    mlflow_url=f"http://127.0.0.1:{service('mlflow').port}",
    prefect_url=f"http://127.0.0.1:{service('prefect-server').port}",
    public_prefect=f"127.0.0.1:{service('prefect-server').port}",
    access_key="sum-local",
    secret_key="sum-local-secret",
    mlflow_bucket="sum-mlflow",
    dvc_bucket="sum-dvc",
)
# compose.yaml's view: service names on the compose network, the images' own ports for PostgreSQL
# and MinIO, secrets and the public host name from infra/.env
COMPOSE = Site(
    host="0.0.0.0",
    postgres="${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432",
    s3_url="http://s3:9000",
    mlflow_url=f"http://mlflow:{service('mlflow').port}",
    prefect_url=f"http://prefect-server:{service('prefect-server').port}",
    public_prefect="${TEAM_HOST}:${PREFECT_PORT}",
    access_key="${S3_ACCESS_KEY}",
    secret_key="${S3_SECRET_KEY}",
    mlflow_bucket="${MLFLOW_BUCKET}",
    dvc_bucket="${DVC_BUCKET}",
)


def render(template: str, site: Site, svc: Service | None = None, state: Path | None = None) -> str:
    """``template`` with the fields of ``site``, the service's ``{port}`` and the ``{state}`` dir."""
    return template.format(**dataclasses.asdict(site), port=svc.port if svc else None, state=state)


def buckets(site: Site) -> tuple[str, str]:
    """The buckets s3-init makes: MLflow's artifact store and the DVC remote."""
    return site.mlflow_bucket, site.dvc_bucket


def client_env(site: Site = NATIVE) -> dict[str, str]:
    """The environment that points MLflow, Prefect, boto3 and DVC clients at the stack."""
    return {k: render(v, site) for k, v in CLIENT_ENV.items()}


class StackError(RuntimeError):
    """A service did not come up or go down; the message names it (and shows its log's tail)."""


# ---------------------------------------------------------------------------------------------
# PostgreSQL: Debian's binaries, an unprivileged user, a data dir in the state dir


def postgres_bin(install: bool = True) -> Path:
    """The bin dir of Debian's PostgreSQL (the newest installed), installing the package if missing."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        newest = max(found, key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
        return Path(newest).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    if not install:
        raise StackError("postgres: initdb not found; install Debian's postgresql package (apt-get install postgresql)")
    _apt_install("postgresql")
    return postgres_bin(install=False)


def _apt_install(package: str) -> None:
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and not shutil.which("sudo"):
        raise StackError(f"postgres: initdb not found and not root; run: sudo apt-get install {package}")
    log.info("postgres: installing Debian's %s package with apt-get", package)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]):
        r = subprocess.run(sudo + cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise StackError(f"postgres: `{' '.join(cmd)}` failed ({r.returncode}):{_last_lines(r.stdout + r.stderr)}")


def postgres_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as when this script is root (PostgreSQL refuses root), created
    as a system user if missing; None when not root (PostgreSQL then runs as the caller)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
            check=True,
        )
        return pwd.getpwnam("postgres")


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    for p in (path, *path.parents):
        st = p.stat()
        if st.st_uid == user.pw_uid or st.st_mode & 0o001 or (st.st_gid == user.pw_gid and st.st_mode & 0o010):
            continue
        raise StackError(
            f"{path}: user {user.pw_name} cannot reach it ({p} has mode {st.st_mode & 0o777:o}); PostgreSQL "
            "refuses to run as root, so give a state dir every user can traverse, e.g. --dir /var/tmp/sum-team"
        )


def init_postgres(state: Path, bin_dir: Path, user: pwd.struct_passwd | None) -> None:
    """``initdb`` into ``<state>/postgres/data`` (once) with the native superuser and password."""
    pgdir = state / "postgres"
    if (pgdir / "data" / "PG_VERSION").is_file():
        return
    if user:
        _check_reachable(state, user)
    pgdir.mkdir(mode=0o700, exist_ok=True)
    pwfile = pgdir / "pwfile"
    pwfile.write_text(PG_PASSWORD + "\n")
    if user:
        os.chown(pgdir, user.pw_uid, user.pw_gid)
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    log.info("postgres: initdb %s", pgdir / "data")
    argv = [str(bin_dir / "initdb"), "-D", str(pgdir / "data"), "-U", PG_USER, f"--pwfile={pwfile}"]
    argv += ["--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"]
    r = subprocess.run(argv, cwd=pgdir, capture_output=True, text=True, **_as_user(user))
    pwfile.unlink()
    if r.returncode != 0:
        raise StackError(f"postgres: initdb {pgdir / 'data'} failed ({r.returncode}):{_last_lines(r.stdout + r.stderr)}")


def init_databases(state: Path, bin_dir: Path) -> None:
    """Run ``postgres-init.sql`` once, as compose's postgres image does on an empty data dir."""
    done = state / "postgres" / "databases-created"
    if done.exists():
        return
    port = service("postgres").port
    argv = [str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-d", "postgres"]
    argv += ["-v", "ON_ERROR_STOP=1", "-q", "-f", str(INIT_SQL)]
    r = subprocess.run(argv, env={**os.environ, "PGPASSWORD": PG_PASSWORD}, capture_output=True, text=True)
    if r.returncode != 0:
        raise StackError(f"postgres: {INIT_SQL.name} failed ({r.returncode}):{_last_lines(r.stdout + r.stderr)}")
    done.touch()
    log.info("postgres: created the databases of %s", INIT_SQL.name)


def _as_user(user: pwd.struct_passwd | None) -> dict:
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}


# ---------------------------------------------------------------------------------------------
# S3: the buckets (compose's s3-init job)


def create_buckets(site: Site = NATIVE) -> None:
    """Create the stack's buckets on the S3 server if they do not exist."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=site.s3_url,
        region_name=REGION,
        aws_access_key_id=site.access_key,
        aws_secret_access_key=site.secret_key,
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for name in buckets(site):
        if name not in existing:
            client.create_bucket(Bucket=name)
    log.info("s3-init: buckets %s", ", ".join(buckets(site)))


# ---------------------------------------------------------------------------------------------
# processes


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _read_pids(state: Path) -> dict[str, dict]:
    """Recorded process groups of ``state``; records from before a reboot are dropped."""
    path = state / "pids.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("boot_id") != _boot_id():
        return {}
    return data.get("services", {})


def _write_pids(state: Path, services: dict[str, dict]) -> None:
    path = state / "pids.json"
    if not services:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"boot_id": _boot_id(), "services": services}, indent=2) + "\n")
    tmp.replace(path)


def _proc_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state letter, parent pid, process group) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2 :].split()
            table[int(entry)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def service_processes(pgid: int) -> set[int]:
    """Live processes of a service: its process group and their descendants (PostgreSQL's
    backends leave the postmaster's group with setsid, a flow run may start its own session)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, _, pgrp) in table.items() if pgrp == pgid}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid for pid in found if table[pid][0] != "Z"}


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of ``pid``, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def _alive(rec: dict) -> bool:
    """The recorded group leader still runs the recorded command (not a reused pid)."""
    st = _proc_stat(rec["pid"])
    if not st or st[0] == "Z":
        return False
    try:
        cmdline = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return False
    tail = rec["argv"][1:]
    return Path(rec["argv"][0]).name in " ".join(cmdline) and (not tail or cmdline[-len(tail) :] == tail)


def _executable(name: str, pg_bin: Path) -> str:
    if name == "postgres":
        return str(pg_bin / "postgres")
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name}: not found beside {sys.executable} or on PATH")
    return found


def _service_env(svc: Service, state: Path) -> dict[str, str]:
    """The caller's environment without its MLflow, Prefect and AWS settings (a developer's
    profile must not redirect a service), plus the service's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: render(v, NATIVE, svc, state) for k, v in svc.env.items()})
    env.update({k: render(v, NATIVE, svc, state) for k, v in svc.native_env.items()})
    return env


def _start(svc: Service, state: Path, pg_bin: Path, pg_user: pwd.struct_passwd | None) -> dict:
    argv = [render(a, NATIVE, svc, state) for a in svc.argv]
    argv[0] = _executable(argv[0], pg_bin)
    logfile = state / "logs" / f"{svc.name}.log"
    for path in svc.native_env.values():
        Path(render(path, NATIVE, svc, state)).mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_service_env(svc, state),
            cwd=state / "postgres" if svc.name == "postgres" else state,
            start_new_session=True,  # its own process group, which down stops as a whole
            **_as_user(pg_user if svc.name == "postgres" else None),
        )
    log.info("%s: started (pid %d), log %s", svc.name, proc.pid, logfile)
    return {"pid": proc.pid, "argv": argv, "log": str(logfile), "started": time.time()}


def _last_lines(text: str, n: int = 30) -> str:
    lines = text.strip().splitlines()[-n:]
    return "\n    ".join(["", *lines]) if lines else "(no output)"


def _log_tail(rec: dict, n: int = 30) -> str:
    try:
        return _last_lines(Path(rec["log"]).read_text(errors="replace"), n)
    except OSError:
        return "(no log)"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """(status, body) of a GET (or a JSON POST when ``body`` is given); None if nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, http.client.HTTPException):
        return None


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def healthy(svc: Service, rec: dict, pg_bin: Path | None = None) -> bool:
    """Whether ``svc`` answers: PostgreSQL accepts connections, an HTTP service answers on its
    health path, the worker has sent a heartbeat to the ``sum-process`` pool since it started."""
    if svc.name == "postgres":
        pg_isready = (pg_bin or postgres_bin(install=False)) / "pg_isready"
        r = subprocess.run([str(pg_isready), "-q", "-h", "127.0.0.1", "-p", str(svc.port), "-d", "postgres"])
        return r.returncode == 0
    if svc.name == "prefect-worker":
        got = _http(f"{NATIVE.prefect_url}/api/work_pools/{WORK_POOL}/workers/filter", body={})
        if not got or got[0] != 200:
            return False
        # a heartbeat since this worker started (not an earlier worker's), and a recent one
        since = max(rec["started"] - 5, time.time() - 120)
        beats = [w.get("last_heartbeat_time") for w in json.loads(got[1])]
        return any(b and datetime.fromisoformat(b.replace("Z", "+00:00")).timestamp() >= since for b in beats)
    got = _http(f"http://127.0.0.1:{svc.port}{svc.health}")
    return bool(got) and (got[0] == 200 if svc.health != "/" else got[0] < 500)


def _url(svc: Service) -> str:
    return {
        "postgres": f"postgresql://127.0.0.1:{svc.port}",
        "s3": NATIVE.s3_url,
        "s3-init": "buckets " + ", ".join(buckets(NATIVE)),
        "mlflow": NATIVE.mlflow_url,
        "prefect-server": NATIVE.prefect_url,
        "prefect-worker": f"pool {WORK_POOL}",
    }[svc.name]


# ---------------------------------------------------------------------------------------------
# up / down / status


def up(state: Path, timeout: float = 180.0, install: bool = True) -> dict[str, str]:
    """Start every service that is not running, each once its dependencies are healthy, and wait
    until all are healthy; services already running are left as they are. Returns the client
    environment. Raises ``StackError`` naming the service (and its log's tail) on failure; what did
    start keeps running until ``down``."""
    state = Path(state).resolve()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    pg_bin = postgres_bin(install)
    pg_user = postgres_user()
    init_postgres(state, pg_bin, pg_user)
    pids = _read_pids(state)
    ok: set[str] = set()
    waiting: dict[str, float] = {}  # service -> deadline
    pending = []
    for svc in SERVICES:
        rec = pids.get(svc.name)
        if svc.argv and rec and _alive(rec):
            if healthy(svc, rec, pg_bin):
                _on_healthy(svc, state, pg_bin)
                ok.add(svc.name)
                log.info("%s: already running (pid %d), %s", svc.name, rec["pid"], _url(svc))
            else:
                waiting[svc.name] = time.monotonic() + timeout
                log.info("%s: running (pid %d), waiting until healthy", svc.name, rec["pid"])
        else:
            pending.append(svc)
    while pending or waiting:
        for svc in [s for s in pending if set(s.depends_on) <= ok]:
            pending.remove(svc)
            if not svc.argv:
                create_buckets(NATIVE)
                ok.add(svc.name)
                continue
            if svc.port and _port_taken(svc.port):
                raise StackError(f"{svc.name}: port {svc.port} on 127.0.0.1 is taken by another program; stop it first")
            pids[svc.name] = _start(svc, state, pg_bin, pg_user)
            _write_pids(state, pids)
            waiting[svc.name] = time.monotonic() + timeout
        if pending and not waiting and not any(set(s.depends_on) <= ok for s in pending):
            raise StackError(f"{pending[0].name}: waits for {', '.join(pending[0].depends_on)}, which no step starts")
        for name in list(waiting):
            svc, rec = service(name), pids[name]
            if healthy(svc, rec, pg_bin):
                _on_healthy(svc, state, pg_bin)
                del waiting[name]
                ok.add(name)
                log.info("%s: healthy after %.0f s, %s", name, time.time() - rec["started"], _url(svc))
            elif not _alive(rec):
                raise StackError(f"{name}: exited before it was healthy; last lines of {rec['log']}:{_log_tail(rec)}")
            elif time.monotonic() > waiting[name]:
                raise StackError(
                    f"{name}: not healthy after {timeout:.0f} s; last lines of {rec['log']}:{_log_tail(rec)}"
                )
        if waiting:
            time.sleep(0.5)
    return client_env()


def _on_healthy(svc: Service, state: Path, pg_bin: Path) -> None:
    if svc.name == "postgres":
        init_databases(state, pg_bin)


def down(state: Path, timeout: float = 30.0) -> None:
    """Stop every recorded service, dependents first: signal its process group, wait until it and
    its descendants are gone, SIGKILL what outlives ``timeout``."""
    state = Path(state).resolve()
    pids = _read_pids(state)
    for svc in reversed(SERVICES):
        rec = pids.get(svc.name)
        if not rec:
            continue
        pgid = rec["pid"]
        procs = service_processes(pgid)
        if procs:
            _signal(pgid, getattr(signal, svc.stop_signal), group=True)
            if not _wait_gone(pgid, procs, timeout):
                log.warning("%s: still running after %.0f s, killing it", svc.name, timeout)
                for pid in procs:
                    _signal(pid, signal.SIGKILL)
                if not _wait_gone(pgid, procs, 10.0):
                    raise StackError(f"{svc.name}: processes {sorted(_live(procs))} survived SIGKILL")
            log.info("%s: stopped", svc.name)
        del pids[svc.name]
        _write_pids(state, pids)


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _live(procs: set[int]) -> set[int]:
    return {pid for pid in procs if (st := _proc_stat(pid)) and st[0] != "Z"}


def _wait_gone(leader: int, procs: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:  # reap the leader when it is our own child (start_team_stack in this process)
            os.waitpid(leader, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _live(procs):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def status(state: Path) -> list[tuple[str, str, str, str]]:
    """(service, state, pid, url) of each service: healthy, starting, stopped or (s3-init) a step."""
    state = Path(state).resolve()
    pids = _read_pids(state)
    rows = []
    for svc in SERVICES:
        rec = pids.get(svc.name)
        if not svc.argv:
            rows.append((svc.name, "step of up", "-", _url(svc)))
        elif rec and _alive(rec):
            rows.append((svc.name, "healthy" if healthy(svc, rec) else "starting", str(rec["pid"]), _url(svc)))
        else:
            rows.append((svc.name, "stopped", "-", _url(svc)))
    return rows


def start_team_stack(state_dir: str | os.PathLike, timeout: float = 180.0) -> dict[str, str]:
    """Bring the native stack up in ``state_dir`` (a fixture's setup); returns the client
    environment (``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``, ``AWS_ENDPOINT_URL_S3``, keys)."""
    return up(Path(state_dir), timeout=timeout)


def stop_team_stack(state_dir: str | os.PathLike) -> None:
    """Stop the native stack of ``state_dir`` (a fixture's teardown)."""
    down(Path(state_dir))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status", "env"])
    p.add_argument(
        "--dir", type=Path, default=REPO / ".cache" / "team", help="state dir: data, logs, pids (default: %(default)s)"
    )
    p.add_argument("--timeout", type=float, default=180.0, help="seconds each service may take to become healthy")
    p.add_argument("--no-install", action="store_true", help="fail instead of apt-get installing PostgreSQL")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.command == "up":
            started = time.monotonic()
            up(a.dir, timeout=a.timeout, install=not a.no_install)
            took = time.monotonic() - started
            log.info("up in %.0f s; point clients at it: eval \"$(%s %s env)\"", took, sys.executable, sys.argv[0])
        elif a.command == "down":
            down(a.dir)
        elif a.command == "status":
            rows = status(a.dir)
            for row in rows:
                print(f"{row[0]:<15} {row[1]:<11} {row[2]:>7}  {row[3]}")
            return 0 if all(r[1] in ("healthy", "step of up") for r in rows) else 1
        else:
            for k, v in client_env().items():
                print(f"export {k}={shlex.quote(v)}")
    except StackError as e:
        log.error("%s", e)
        if a.command == "up" and _read_pids(a.dir.resolve()):
            log.error("what did start keeps running; stop it with: %s down --dir %s", sys.argv[0], a.dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
