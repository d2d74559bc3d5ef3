"""A local stand-in of cluster/aws-gpu.yaml for development and tests, on loopback.

It starts, with free ports and bounded waits:
- the S3 API (``moto_server -H 127.0.0.1``) and the artifact bucket in it;
- PostgreSQL (Debian's binaries, a cluster of its own in the stand-in's folder, on 127.0.0.1), the
  run database, as RDS is on the AWS cluster and the manifests' database on KubeRay;
- an MLflow tracking server (``mlflow db upgrade`` first, then ``--backend-store-uri postgresql://...``,
  ``--artifacts-destination s3://BUCKET/mlflow``, ``--host 127.0.0.1``) whose S3 client points at that
  endpoint;
- a Ray head (``ray start --head --block``) with the dashboard on 127.0.0.1, token auth on (its own
  token file, so ``~/.ray`` is untouched), the ``trial_driver`` resource of the real head, and its
  own temp dir and ports, so it never meets another Ray cluster on the same machine.

The dashboard, MLflow and S3 listen on 127.0.0.1 only (the test checks it). Ray's internal gRPC
servers (GCS, raylet, object manager) bind as Ray binds them, which can be every interface; token
auth guards them, as on the cluster, where the security group does the rest.
Everything is stopped by process group and by the stand-in's own temp dir, never by name.

    python cluster/local_standin.py up [--dir DIR] [--num-cpus N]   # prints addresses and exports
    python cluster/local_standin.py down [--dir DIR]

``restart_head`` replaces the head (Ray and the MLflow server) by a new one, as a replaced head node
would: the runs live on in PostgreSQL and the artifacts and checkpoints in S3.

    from cluster.local_standin import standin
    with standin(tmp_path) as s:
        subprocess.run([..., "ray", "job", "submit", "--address", s.dashboard_url, ...], env=s.env)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
BUCKET = "unmix-standin"
STATE_FILE = "standin.json"
DEFAULT_DIR = Path(tempfile.gettempdir()) / f"unmix-standin-{os.getuid()}"
# moto accepts any credentials; these are placeholders for boto3, valid nowhere else.
S3_ENV = {"AWS_ACCESS_KEY_ID": "standin", "AWS_SECRET_ACCESS_KEY": "standin",
          "AWS_DEFAULT_REGION": "us-east-1"}
# Ray's own ports and its workers' ports come from one block below the kernel's ephemeral range,
# checked free at start, so they cannot collide with outgoing connections or other clusters.
PORT_BLOCK = 64
PORT_RANGE = (20000, 32000)


class StandinError(RuntimeError):
    pass


@dataclass
class Standin:
    """Addresses of a running stand-in and the environment a client needs to use it."""

    root: str
    bucket: str
    s3_endpoint: str
    mlflow_uri: str
    postgres_uri: str
    dashboard_url: str
    ray_address: str  # GCS address, for ray.init(address=...)
    token_path: str
    ray_temp_dir: str
    pids: dict[str, int] = field(default_factory=dict)  # service -> pid (= its process group)
    pg_dir: str = ""  # PostgreSQL's data and sockets

    @property
    def env(self) -> dict[str, str]:
        """``os.environ`` plus what a client (``ray job submit``, MLflow, boto3) needs."""
        return {**os.environ, **self.client_env}

    @property
    def client_env(self) -> dict[str, str]:
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "RAY_ADDRESS": self.dashboard_url,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            **S3_ENV,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    for host in (HOST, "0.0.0.0"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def port_block(size: int = PORT_BLOCK, attempts: int = 200) -> list[int]:
    """``size`` consecutive free ports in PORT_RANGE."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - size)
        if all(_bindable(p) for p in range(base, base + size)):
            return list(range(base, base + size))
    raise StandinError(f"no {size} consecutive free ports in {PORT_RANGE}")


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``check()`` until it returns truthy, the process dies, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:  # noqa: BLE001 - any failure of a probe means "not yet"
            pass
        if proc is not None and proc.poll() is not None:
            raise StandinError(f"{what}: exited with {proc.returncode}\n{_tail(log) if log else ''}")
        if time.monotonic() > deadline:
            raise StandinError(f"{what}: not ready after {timeout:.0f} s\n{_tail(log) if log else ''}")
        time.sleep(0.5)


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new session (so its process group can be stopped as a whole)."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def _bin(name: str) -> str:
    """An executable next to this Python (the venv's), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StandinError(f"{name} not found (install the dev dependencies: moto[server], mlflow, ray)")
    return found


def start_s3(root: Path, bucket: str = BUCKET, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    import boto3

    port = free_port()
    log = root / "moto.log"
    proc = _spawn([_bin("moto_server"), "-H", HOST, "-p", str(port)], log)
    endpoint = f"http://{HOST}:{port}"
    _wait(lambda: _http_status(endpoint + "/") == 200, "moto_server", timeout, proc, log)
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                      region_name=S3_ENV["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket=bucket)
    return proc, endpoint


def _postgres_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise StandinError(f"PostgreSQL's {name} not found (Debian: apt-get install postgresql)")
    return str(found[-1])


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` system user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start_postgres(root: Path, timeout: float = 60) -> tuple[subprocess.Popen, str, Path]:
    """A PostgreSQL cluster of the stand-in's own on 127.0.0.1, with a database ``mlflow`` that the user
    ``mlflow`` owns; local trust authentication, as befits a loopback-only stand-in. Returns the process,
    the URI and its folder: ``root/pg``, or as root a folder of the ``postgres`` user under /tmp, since
    ``root`` may lie below folders that only root may enter (pytest's, for one)."""
    if os.geteuid() == 0:
        home = Path(tempfile.mkdtemp(prefix="urs-pg-", dir="/tmp"))
        shutil.chown(home, "postgres", "postgres")
    else:
        home = root / "pg"
        home.mkdir(exist_ok=True)
    data, sockets = home / "data", home / "sockets"
    subprocess.run(_as_postgres(["mkdir", "-p", str(data), str(sockets)]), check=True, timeout=30)
    if not (data / "PG_VERSION").exists():
        subprocess.run(_as_postgres([_postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow",
                                     "--no-sync"]), check=True, capture_output=True, timeout=120)
    port = free_port()
    log = root / "postgres.log"
    proc = _spawn(_as_postgres([_postgres_bin("postgres"), "-D", str(data), "-h", HOST, "-p", str(port),
                                "-k", str(sockets)]), log)
    ready = [_postgres_bin("pg_isready"), "-h", HOST, "-p", str(port), "-U", "mlflow"]
    _wait(lambda: subprocess.run(ready, capture_output=True).returncode == 0, "postgres", timeout, proc, log)
    subprocess.run([_postgres_bin("createdb"), "-h", HOST, "-p", str(port), "-U", "mlflow", "mlflow"],
                   capture_output=True)  # exists already when a stand-in is started on an old folder
    return proc, f"postgresql://mlflow@{HOST}:{port}/mlflow", home


def start_mlflow(root: Path, s3_endpoint: str, backend_uri: str, bucket: str = BUCKET,
                 timeout: float = 180) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = root / "mlflow.log"
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    # The schema migrations first, as the cluster's MLflow start does (cluster/mlflow_server.py).
    subprocess.run([_bin("mlflow"), "db", "upgrade", backend_uri], env=env, check=True, capture_output=True,
                   timeout=300)
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", HOST, "--port", str(port),
           "--workers", "1"]
    proc = _spawn(cmd, log, env)
    uri = f"http://{HOST}:{port}"
    # The server needs ~20 s (more on a busy machine) before /health answers.
    _wait(lambda: _http_status(uri + "/health") == 200, "mlflow server", timeout, proc, log)
    return proc, uri


def start_ray(root: Path, num_cpus: int = 2, trial_drivers: int = 4, timeout: float = 180,
              job_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str, str, str]:
    """``ray start --head --block`` on loopback; returns (process, dashboard URL, GCS address,
    token file, temp dir). ``job_env`` is in the head's environment, so every job, trial driver and
    worker inherits it, as on the cluster's head (its MLflow server and S3 endpoint)."""
    token_path = root / "ray_auth_token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    # Unix socket paths are limited to ~107 bytes: keep Ray's temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="urs-", dir="/tmp")
    (root / "ray_temp_dir").write_text(temp_dir)
    ports = port_block()
    gcs, dashboard, client, node_mgr, obj_mgr, metrics, agent_listen, agent_grpc, runtime_env = ports[:9]
    # Jobs' `python` is this interpreter (the project's venv), as on the cluster image.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` gives a sweep time to end its runs (KILLED) and save
    # Tune's state after SIGTERM, before SIGKILL (Ray's default is 3 s).
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
           "RAY_JOB_STOP_WAIT_TIME_S": "120",
           "RAY_USAGE_STATS_ENABLED": "0", **(job_env or {})}
    env.pop("RAY_ADDRESS", None)
    cmd = [_bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
           f"--node-ip-address={HOST}", f"--port={gcs}", f"--num-cpus={num_cpus}", "--num-gpus=0",
           f"--resources={json.dumps({'trial_driver': trial_drivers})}",
           "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--metrics-export-port={metrics}",
           f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--min-worker-port={ports[9]}",
           f"--max-worker-port={ports[-1]}", f"--temp-dir={temp_dir}"]
    log = root / "ray.log"
    proc = _spawn(cmd, log, env)
    url = f"http://{HOST}:{dashboard}"
    auth = {"Authorization": f"Bearer {token_path.read_text().strip()}"}
    _wait(lambda: _http_status(url + "/api/version", auth) == 200, "ray dashboard", timeout, proc, log)
    return proc, url, f"{HOST}:{gcs}", str(token_path), temp_dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (the stand-in's own temp dir)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            out.append(int(entry.name))
    return out


def _stop_group(pid: int, grace: float = 20) -> None:
    """SIGTERM the process group led by ``pid`` (started in its own session), then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


# Seconds between SIGTERM and SIGKILL per service. `ray start --block` never exits on SIGTERM and its
# raylet waits for its workers; Ray keeps no state the stand-in needs (runs live in PostgreSQL and S3).
GRACE_S = {"ray": 2.0}


def _stop_service(state: Standin, name: str, grace: float = 20) -> None:
    _stop_group(state.pids.pop(name), GRACE_S.get(name, grace))


def stop(state: Standin, grace: float = 20) -> None:
    """Stop every process of the stand-in: Ray first, then MLflow, PostgreSQL and S3."""
    for name in ("ray", "mlflow", "postgres", "s3"):
        if name in state.pids:
            _stop_service(state, name, grace)
    stop_ray_leftovers(state)
    if state.pg_dir and not Path(state.pg_dir).is_relative_to(state.root):
        shutil.rmtree(state.pg_dir, ignore_errors=True)


def stop_ray_leftovers(state: Standin) -> None:
    """Ray workers and helpers that left the group: every process naming our temp dir is ours."""
    if state.ray_temp_dir:
        for pid in _pids_mentioning(state.ray_temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(state.ray_temp_dir, ignore_errors=True)


def up(root: str | Path, num_cpus: int = 2, trial_drivers: int = 4, bucket: str = BUCKET) -> Standin:
    """Start the stand-in under ``root`` (logs, database, token, state file); stop whatever
    already started if a later part fails."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    state = Standin(str(root), bucket, "", "", "", "", "", "", "")
    try:
        s3, state.s3_endpoint = start_s3(root, bucket)
        state.pids["s3"] = s3.pid
        postgres, state.postgres_uri, pg_dir = start_postgres(root)
        state.pids["postgres"], state.pg_dir = postgres.pid, str(pg_dir)
        _start_head(state, num_cpus, trial_drivers)
    except BaseException:
        stop(state)
        raise
    (root / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return state


def _start_head(state: Standin, num_cpus: int, trial_drivers: int) -> None:
    """The head's processes: the MLflow server (on the stand-in's PostgreSQL and S3) and Ray."""
    root = Path(state.root)
    mlflow, state.mlflow_uri = start_mlflow(root, state.s3_endpoint, state.postgres_uri, state.bucket)
    state.pids["mlflow"] = mlflow.pid
    temp_marker = root / "ray_temp_dir"
    try:
        job_env = {"MLFLOW_TRACKING_URI": state.mlflow_uri, "MLFLOW_S3_ENDPOINT_URL": state.s3_endpoint,
                   "AWS_ENDPOINT_URL_S3": state.s3_endpoint, **S3_ENV}
        ray, state.dashboard_url, state.ray_address, state.token_path, state.ray_temp_dir = start_ray(
            root, num_cpus, trial_drivers, job_env=job_env)
    except BaseException:
        if temp_marker.exists():
            state.ray_temp_dir = temp_marker.read_text()
        raise
    state.pids["ray"] = ray.pid


def restart_head(state: Standin, num_cpus: int = 2, trial_drivers: int = 4) -> Standin:
    """Replace the head: stop its Ray and MLflow server (their addresses change), keep PostgreSQL and S3,
    start new ones. Returns the stand-in with its new addresses."""
    for name in ("ray", "mlflow"):
        _stop_service(state, name)
    stop_ray_leftovers(state)
    _start_head(state, num_cpus, trial_drivers)
    (Path(state.root) / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return state


def load(root: str | Path) -> Standin:
    return Standin(**json.loads((Path(root) / STATE_FILE).read_text()))


def down(root: str | Path) -> None:
    path = Path(root) / STATE_FILE
    if not path.exists():
        raise StandinError(f"no stand-in recorded in {root}")
    stop(load(root))
    path.unlink()


@contextlib.contextmanager
def standin(tmp_path: str | Path, num_cpus: int = 2, trial_drivers: int = 4) -> Iterator[Standin]:
    """The stand-in for the duration of a ``with`` block (tests)."""
    state = up(tmp_path, num_cpus, trial_drivers)
    try:
        yield state
    finally:
        stop(state)
        (Path(state.root) / STATE_FILE).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", default=str(DEFAULT_DIR),
                        help=f"state, logs and database (default {DEFAULT_DIR})")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--trial-drivers", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            if (Path(args.dir) / STATE_FILE).exists():
                raise StandinError(f"a stand-in is already recorded in {args.dir}; run `down` first")
            s = up(args.dir, args.num_cpus, args.trial_drivers)
            print(f"ray dashboard   {s.dashboard_url}\nmlflow          {s.mlflow_uri}\n"
                  f"s3 endpoint     {s.s3_endpoint} (bucket {s.bucket})\nlogs            {s.root}\n")
            print("# for clients (ray job submit, mlflow, boto3):")
            for k, v in s.client_env.items():
                print(f"export {k}={v}")
        else:
            down(args.dir)
            print(f"stopped the stand-in recorded in {args.dir}")
    except StandinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
