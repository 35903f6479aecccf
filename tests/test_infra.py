"""infra/: compose.yaml, .env.example and the native stack's table (infra/team.py SERVICES) agree,
and the native stack comes up, serves real MLflow, Prefect, S3 and DVC clients, and goes down
leaving no process behind."""

from __future__ import annotations

import copy
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import REPO

INFRA = REPO / "infra"


def _load_team():
    """infra/team.py as a module (infra/ is no package: it runs as a script)."""
    spec = importlib.util.spec_from_file_location("infra_team", INFRA / "team.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


team = _load_team()

# ---------------------------------------------------------------------------------------------
# compose.yaml against the table, without running anything

# $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def env_example(path: Path = INFRA / ".env.example") -> dict[str, str]:
    env = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}:{n}: expected KEY=VALUE, got {line!r}"
            env[key.strip()] = value.strip()
    return env


def compose_file(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def compose_variables(compose: dict) -> dict[str, set[str]]:
    """Variable name -> the defaults compose.yaml gives it (``${VAR:-default}``)."""
    found: dict[str, set[str]] = {}
    for s in _strings(compose):
        for m in _VAR.finditer(s):
            if m.group(0) != "$$":
                defaults = found.setdefault(m.group(1) or m.group(4), set())
                if m.group(2) in (":-", "-"):
                    defaults.add(m.group(3))
    return found


def interpolate(node, env: dict[str, str]):
    """``node`` with compose's variable syntax filled from ``env``, as ``docker compose`` does."""
    if isinstance(node, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def fill(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = env.get(name)
        if op and op.endswith("-") and (value is None or (op == ":-" and value == "")):
            return arg
        if value is None:
            raise KeyError(f"compose.yaml uses ${{{name}}}, which .env.example does not set")
        return value

    return _VAR.sub(fill, node)


def _ports(spec: dict) -> list[tuple[int, int]]:
    pairs = []
    for p in spec.get("ports", []):
        published, _, target = str(p).rpartition(":")
        pairs.append((int(published), int(target)))
    return pairs


def _compose_env(spec: dict) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(spec: dict) -> list[str]:
    cmd = spec.get("command")
    return [str(a) for a in cmd] if isinstance(cmd, list) else str(cmd or "").split()


def _image_port(url: str) -> int:
    return urlsplit(url if "//" in url else f"//{url}").port


def disagreements(raw_compose: dict, env: dict[str, str], services=None) -> list[str]:
    """Every way compose.yaml (with ``env``, the .env.example values) and the native table
    disagree: services, published and container ports, commands, environment, dependencies,
    health checks, buckets, variables. Empty when they agree."""
    services = team.SERVICES if services is None else services
    out = []
    used = compose_variables(raw_compose)
    for name in sorted(set(used) - set(env)):
        out.append(f"compose.yaml uses ${{{name}}}, which .env.example does not set")
    for name in sorted(set(env) - set(used)):
        out.append(f".env.example sets {name}, which compose.yaml does not use")
    for name, defaults in sorted(used.items()):
        if name in env and defaults - {env[name]}:
            out.append(f"compose.yaml defaults {name} to {sorted(defaults)}, .env.example sets {env[name]!r}")
    if out:
        return out

    compose = interpolate(raw_compose, env)

    def in_compose(template: str, svc) -> str:
        return interpolate(team.render(template, team.COMPOSE, svc), env)

    table = {s.name: s for s in services}
    got = compose.get("services", {})
    for name in sorted(set(table) ^ set(got)):
        out.append(f"{name}: in {'team.py SERVICES' if name in table else 'compose.yaml'} only")
    for name in sorted(set(table) & set(got)):
        svc, spec = table[name], got[name]
        # ports: published the same; inside, the table's port where compose runs the table's
        # command, the image's own port where a stand-in runs natively
        ports = _ports(spec)
        published = [p for p, _ in ports]
        if published != ([svc.port] if svc.port else []):
            out.append(f"{name}: compose.yaml publishes {published}, team.py {svc.port}")
        if svc.port and ports:
            inside = {"postgres": _image_port(in_compose("{postgres}", svc)), "s3": _image_port(in_compose("{s3_url}", svc))}
            want = inside.get(name, svc.port) if svc.stand_in else svc.port
            if ports[0][1] != want:
                out.append(f"{name}: container port {ports[0][1]} in compose.yaml, expected {want}")
        deps = spec.get("depends_on") or {}
        if set(deps) != set(svc.depends_on):
            out.append(f"{name}: depends on {sorted(deps)} in compose.yaml, {sorted(svc.depends_on)} in team.py")
        for dep, cond in (deps.items() if isinstance(deps, dict) else []):
            want = "service_completed_successfully" if not table.get(dep, svc).argv else "service_healthy"
            if cond.get("condition") != want:
                out.append(f"{name}: waits for {dep} with {cond.get('condition')}, expected {want}")
        if svc.stand_in:
            continue
        # the table's command and environment, rendered for compose's site
        want_cmd = [in_compose(a, svc) for a in svc.argv]
        if _command(spec) != want_cmd:
            out.append(f"{name}: command in compose.yaml {_command(spec)}, from team.py {want_cmd}")
        have_env, want_env = _compose_env(spec), {k: in_compose(v, svc) for k, v in svc.env.items()}
        for key in sorted(set(want_env) | set(have_env)):
            if key in svc.compose_env:
                if key not in have_env:
                    out.append(f"{name}: compose.yaml lacks {key}, which team.py says it sets")
            elif have_env.get(key) != want_env.get(key):
                out.append(f"{name}: {key}={have_env.get(key)!r} in compose.yaml, {want_env.get(key)!r} from team.py")
        if svc.health:
            check = " ".join(spec.get("healthcheck", {}).get("test", []))
            url = f"http://127.0.0.1:{svc.port}{svc.health}"
            if url not in check:
                out.append(f"{name}: compose.yaml's healthcheck does not poll {url}: {check!r}")
    if "s3-init" in got:
        made = re.findall(r"\bteam/([A-Za-z0-9.-]+)", " ".join(_command(got["s3-init"])))
        want = [interpolate(b, env) for b in team.buckets(team.COMPOSE)]
        if made != want:
            out.append(f"s3-init: compose.yaml makes buckets {made}, team.py {want}")
    if list(team.buckets(team.NATIVE)) != [interpolate(b, env) for b in team.buckets(team.COMPOSE)]:
        out.append(f"buckets: team.py NATIVE {team.buckets(team.NATIVE)}, .env.example differs")
    return out


def test_compose_agrees_with_the_native_table():
    assert disagreements(compose_file(), env_example()) == []


def _set(compose: dict, path: str, value) -> dict:
    """``compose`` with the value at ``path`` ("services/mlflow/ports") replaced."""
    *parents, last = path.split("/")
    node = compose
    for key in parents:
        node = node[key]
    node[last] = value
    return compose


def _with_env(compose: dict, service: str, **env) -> dict:
    return _set(compose, f"services/{service}/environment", {**compose["services"][service]["environment"], **env})


def _without_arg(compose: dict, service: str, arg: str) -> dict:
    return _set(compose, f"services/{service}/command", [a for a in compose["services"][service]["command"] if a != arg])


def _replace(services, name: str, **changes):
    return tuple(dataclasses.replace(s, **changes) if s.name == name else s for s in services)


# (compose, env, services) -> the same with one side edited
ONE_SIDED_EDITS = {
    "compose: mlflow published on another port": lambda c, e, s: (_set(c, "services/mlflow/ports", ["15001:15000"]), e, s),
    "compose: prefect server listening on another port": lambda c, e, s: (
        _set(c, "services/prefect-server/command", ["prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200"]),
        e,
        s,
    ),
    "compose: mlflow without --serve-artifacts": lambda c, e, s: (_without_arg(c, "mlflow", "--serve-artifacts"), e, s),
    "compose: worker on another pool": lambda c, e, s: (
        _set(c, "services/prefect-worker/command", ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]),
        e,
        s,
    ),
    "compose: worker's API URL": lambda c, e, s: (
        _with_env(c, "prefect-worker", PREFECT_API_URL="http://prefect-server:4200/api"), e, s
    ),
    "compose: a variable .env.example lacks": lambda c, e, s: (
        _with_env(c, "prefect-worker", EXTRA="${NOT_IN_ENV_EXAMPLE}"), e, s
    ),
    "compose: an extra service": lambda c, e, s: (_set(c, "services/redis", {"image": "redis:7"}), e, s),
    "compose: mlflow no longer waits for the buckets": lambda c, e, s: (
        _set(c, "services/mlflow/depends_on", {"postgres": {"condition": "service_healthy"}}), e, s
    ),
    ".env.example: another Prefect port": lambda c, e, s: (c, {**e, "PREFECT_PORT": "14201"}, s),
    ".env.example: another DVC bucket": lambda c, e, s: (c, {**e, "DVC_BUCKET": "team-dvc"}, s),
    "team.py: mlflow on another port": lambda c, e, s: (c, e, _replace(s, "mlflow", port=15001)),
    "team.py: postgres on another port": lambda c, e, s: (c, e, _replace(s, "postgres", port=5432)),
    "team.py: prefect server with another argument": lambda c, e, s: (
        c, e, _replace(s, "prefect-server", argv=(*team.service("prefect-server").argv, "--no-ui"))
    ),
    "team.py: a worker variable compose lacks": lambda c, e, s: (
        c, e, _replace(s, "prefect-worker", env={**team.service("prefect-worker").env, "EXTRA": "1"})
    ),
}


@pytest.mark.parametrize("edit", list(ONE_SIDED_EDITS))
def test_an_edit_on_one_side_only_is_caught(edit):
    compose, env, services = ONE_SIDED_EDITS[edit](copy.deepcopy(compose_file()), env_example(), team.SERVICES)
    assert disagreements(compose, env, services), edit


def test_compose_runs_the_shared_init_sql_and_the_urls_name_its_databases():
    spec = compose_file()["services"]["postgres"]
    assert "./postgres-init.sql:/docker-entrypoint-initdb.d/10-databases.sql:ro" in spec["volumes"]
    created = set(re.findall(r"CREATE DATABASE (\w+);", (INFRA / "postgres-init.sql").read_text()))
    mlflow_uri = team.service("mlflow").argv[team.service("mlflow").argv.index("--backend-store-uri") + 1]
    prefect_uri = team.service("prefect-server").env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert created == {mlflow_uri.rsplit("/", 1)[1], prefect_uri.rsplit("/", 1)[1]} == {"mlflow", "prefect"}


def test_images_build_from_the_dockerfile_with_the_locked_extras():
    services = compose_file()["services"]
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        build = services[name]["build"]
        assert (INFRA / build["context"]).resolve() == REPO and build["dockerfile"] == "infra/Dockerfile", name
        assert build["args"]["VARIANT"] == "cpu", name
    dockerfile = (INFRA / "Dockerfile").read_text()
    variants = set(re.findall(r"^FROM \S+ AS base-(\w+)$", dockerfile, re.M))
    assert variants == {"cpu", "cuda"} and "FROM base-${VARIANT}" in dockerfile
    assert "uv sync --frozen $SUM_EXTRAS" in dockerfile and "git" in dockerfile
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert set(re.findall(r"--extra (\w+)", dockerfile)) <= extras
    gpu = compose_file("compose.gpu.yaml")["services"]
    assert set(gpu) == {"prefect-worker"} and gpu["prefect-worker"]["build"]["args"]["VARIANT"] == "cuda"
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "data", "infra/.env", ".dvc/config.local"} <= set(ignored)


def test_no_secrets_committed():
    """.env is ignored; .env.example only holds placeholders."""
    assert ".env" in (INFRA / ".gitignore").read_text().split()
    env = env_example()
    for key in ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        assert env[key].startswith("change-me"), key


def test_native_commands_are_the_compose_commands_on_loopback():
    rendered = [team.render(a, team.NATIVE, team.service("mlflow"), Path("/state")) for a in team.service("mlflow").argv]
    assert rendered[rendered.index("--host") + 1] == "127.0.0.1" and rendered[rendered.index("--port") + 1] == "15000"
    assert "postgresql+psycopg2://sum:sum-local-only@127.0.0.1:15432/mlflow" in rendered
    assert team.client_env() == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:15000",
        "PREFECT_API_URL": "http://127.0.0.1:14200/api",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:19000",
        "AWS_ACCESS_KEY_ID": "sum-local",
        "AWS_SECRET_ACCESS_KEY": "sum-local-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


# ---------------------------------------------------------------------------------------------
# the native stack, for real


def _postgres_obtainable() -> bool:
    if glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"):
        return True
    return shutil.which("apt-get") is not None and (os.geteuid() == 0 or shutil.which("sudo") is not None)


def _team_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(INFRA / "team.py"), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


FLOW_SOURCE = '''
import os

import mlflow
from prefect import flow


@flow
def infra_check(tag: str) -> None:
    """Runs on the stack's worker: logs to MLflow through the worker's MLFLOW_TRACKING_URI."""
    mlflow.set_experiment("infra-check-flow")
    with mlflow.start_run(run_name=tag):
        mlflow.set_tag("s3_endpoint", os.environ["AWS_ENDPOINT_URL_S3"])
'''


@pytest.mark.slow
@pytest.mark.skipif(not _postgres_obtainable(), reason="no PostgreSQL and no way to apt-get install it")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the native stack reads /proc")
def test_native_stack_serves_mlflow_prefect_and_dvc_then_stops(tmp_path):
    # PostgreSQL runs as the postgres user when we are root: a state dir it can reach (pytest's
    # tmp_path sits under a 0700 dir)
    state = Path(tempfile.mkdtemp(prefix="sum-team-"))
    state.chmod(0o755)
    procs: set[int] = set()
    try:
        try:
            r = _team_cli("up", "--dir", str(state), "--timeout", "300")
            assert r.returncode == 0, r.stderr

            # a second up finds everything running; the library entry point returns the client env
            env = team.start_team_stack(state, timeout=300)
            r = _team_cli("up", "--dir", str(state))
            assert r.returncode == 0, r.stderr
            for name in ("postgres", "s3", "mlflow", "prefect-server", "prefect-worker"):
                assert f"{name}: already running" in r.stderr, r.stderr
            r = _team_cli("status", "--dir", str(state))
            assert r.returncode == 0 and r.stdout.count("healthy") == 5, r.stdout
            r = _team_cli("env")
            assert r.returncode == 0
            assert dict(re.findall(r"^export (\w+)=(\S+)$", r.stdout, re.M)) == env

            _check_mlflow(env)
            _check_prefect(env, tmp_path)
            _check_dvc(env, tmp_path)

            services = json.loads((state / "pids.json").read_text())["services"]
            procs = set().union(*(team.service_processes(rec["pid"]) for rec in services.values()))
            assert len(procs) > len(services)  # PostgreSQL's backends, uvicorn's worker
        finally:
            down = _team_cli("down", "--dir", str(state), timeout=300)
        assert down.returncode == 0, down.stderr
        assert not {pid for pid in procs if _running(pid)}, "processes of the stack outlived down"
        for svc in team.SERVICES:
            assert not (svc.port and _port_open(svc.port)), f"{svc.name}: port {svc.port} still open"
        assert not (state / "pids.json").exists()
        assert _team_cli("status", "--dir", str(state)).stdout.count("stopped") == 5
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def _check_mlflow(env: dict[str, str]) -> None:
    """A run with an artifact: the artifact lands in the bucket, the run in PostgreSQL."""
    import psycopg2
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp_id = client.create_experiment(f"infra-check-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    client.log_text(run.info.run_id, "hello from the team stack", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri == f"mlflow-artifacts:/{exp_id}/{run.info.run_id}/artifacts"

    s3 = _s3(env)
    key = f"{exp_id}/{run.info.run_id}/artifacts/notes/hello.txt"
    assert s3.get_object(Bucket="sum-mlflow", Key=key)["Body"].read() == b"hello from the team stack"

    port = team.service("postgres").port
    dsn = dict(host="127.0.0.1", port=port, user=team.PG_USER, password=team.PG_PASSWORD, dbname="mlflow")
    with psycopg2.connect(**dsn) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cur.fetchone() == ("FINISHED",)
    conn.close()


def _check_prefect(env: dict[str, str], tmp_path: Path) -> None:
    """The sum-process pool exists with a live worker, which runs a deployed flow that logs to MLflow."""
    from mlflow import MlflowClient
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    source = tmp_path / "flows"
    source.mkdir()
    (source / "infra_check.py").write_text(FLOW_SOURCE)
    tag = uuid.uuid4().hex[:8]
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            assert client.api_healthcheck() is None
            assert client.read_work_pool(team.WORK_POOL).type == "process"
            workers = client.read_workers_for_work_pool(team.WORK_POOL)
            assert any(w.status == WorkerStatus.ONLINE for w in workers), workers
        deployable = flow.from_source(source=str(source), entrypoint="infra_check.py:infra_check")
        deployable.deploy(name="infra-check", work_pool_name=team.WORK_POOL, print_next_steps=False, ignore_warnings=True)
        run = run_deployment("infra-check/infra-check", parameters={"tag": tag}, timeout=300)
        assert run.state is not None and run.state.is_completed(), run.state

    mlflow_client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = mlflow_client.get_experiment_by_name("infra-check-flow")
    runs = mlflow_client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{tag}'")
    assert [r.data.tags["s3_endpoint"] for r in runs] == [env["AWS_ENDPOINT_URL_S3"]]


def _check_dvc(env: dict[str, str], tmp_path: Path) -> None:
    """`dvc push` to the remote named team (s3://sum-dvc/) with the endpoint and keys from the environment."""
    repo = tmp_path / "dvc-repo"
    repo.mkdir()
    dvc = str(Path(sys.executable).parent / "dvc")
    run_env = {**os.environ, **env}
    for cmd in (
        ["git", "init", "-q"],
        [dvc, "init", "-q"],
        [dvc, "remote", "add", "-d", "team", "s3://sum-dvc/"],
    ):
        subprocess.run(cmd, cwd=repo, env=run_env, check=True, capture_output=True)
    (repo / "data.txt").write_text("tracked by DVC\n")
    subprocess.run([dvc, "add", "-q", "data.txt"], cwd=repo, env=run_env, check=True, capture_output=True)
    r = subprocess.run([dvc, "push", "-r", "team"], cwd=repo, env=run_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md5 = yaml.safe_load((repo / "data.txt.dvc").read_text())["outs"][0]["md5"]
    s3 = _s3(env)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="sum-dvc").get("Contents", [])]
    assert f"files/md5/{md5[:2]}/{md5[2:]}" in keys
