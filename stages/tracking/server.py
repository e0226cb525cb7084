"""A team tracking server: `mlflow server` on a PostgreSQL backend store (`make mlflow-server`).

    python -m stages.tracking.server [--host 127.0.0.1] [--port 5000] [--data data/tracking-server]
                            [--auth] [--allowed-hosts mlflow.example.com] [--insecure]

PostgreSQL (Debian's `postgresql` package) keeps runs, params, metrics and the model registry;
the artifacts (models, plots) go to <data>/artifacts, served by the tracking server itself, so
clients need no access to that folder. PostgreSQL is started by this command with its cluster in
<data>/postgres (made on first use) and listens on no network port at all: only on a Unix
socket in that folder, which only its owner can enter. The pipeline logs here when
MLFLOW_TRACKING_URI=http://<host>:<port> is set.

Secure by default:
- the server binds to loopback (127.0.0.1) unless --host says otherwise;
- --auth turns on MLflow's basic-auth app: every request needs a user name and password
  (clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD). The admin user is created
  on first start with the password in MLFLOW_AUTH_ADMIN_PASSWORD, which must be set: there is no
  default password. Users and permissions live in PostgreSQL too;
- a --host other than loopback without --auth is refused (--insecure overrides that);
- MLflow checks the Host header against --allowed-hosts (DNS-rebinding protection). Put TLS in
  front (a reverse proxy) before passwords cross a network: basic auth sends them in clear.

Ctrl-C (or SIGTERM) stops the tracking server, then PostgreSQL.
"""

from __future__ import annotations

import argparse
import glob
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from stages.errors import StageError

DATA = Path("data/tracking-server")  # git-ignored, like every other local store
DATABASES = ("mlflow", "mlflow_auth")  # runs and registry; users and permissions (--auth)
ROLE = "mlflow"  # the PostgreSQL role MLflow connects as


def pg_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, or where Debian installs it (/usr/lib/postgresql/<v>/bin)."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise StageError(
            f"PostgreSQL's {name} was not found: install it (Debian: apt-get install postgresql)"
        )
    return found


def as_owner(cmd: list[str], owner: str | None) -> list[str]:
    """PostgreSQL refuses to run as root: as root, its programs run as the `postgres` user."""
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


def cluster_owner() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StageError(
            "running as root, and there is no `postgres` user to run PostgreSQL "
            "as: install Debian's postgresql package, or run as another user"
        ) from None
    return "postgres"


def database_uri(folder: Path, database: str) -> str:
    """SQLAlchemy's URI of a database reached through the cluster's Unix socket."""
    return f"postgresql+psycopg2://{ROLE}@/{database}?host={folder.resolve()}"


def postgres(program: str, *args: str, check: bool = True) -> str:
    """Run one of PostgreSQL's programs (as its user, when root); its output, or a one-line error."""
    result = subprocess.run(
        as_owner([pg_bin(program), *args], cluster_owner()), capture_output=True, text=True
    )
    if check and result.returncode != 0:
        said = "; ".join(
            (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        )
        raise StageError(f"PostgreSQL's {program} failed: {said[:400]}")
    return result.stdout


def start_postgres(folder: Path) -> None:
    """Make the cluster on first use, start it on its Unix socket only, create the databases."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    owner = cluster_owner()
    if owner:
        shutil.chown(folder, owner, owner)
        if subprocess.run(as_owner(["test", "-w", str(folder)], owner)).returncode != 0:
            raise StageError(
                f"the postgres user can't reach {folder} (a parent folder is closed "
                "to it): choose --data in a folder it can enter"
            )
    if not (folder / "PG_VERSION").exists():
        # trust is safe here: the socket is the only way in, and the folder is mode 0700
        postgres(
            "initdb",
            "-D",
            str(folder),
            "-U",
            ROLE,
            "-E",
            "UTF8",
            "--auth-local=trust",
            "--auth-host=reject",
        )
    postgres(
        "pg_ctl",
        "start",
        "-D",
        str(folder),
        "-w",
        "-l",
        str(folder / "postgres.log"),
        "-o",
        f"-c listen_addresses='' -c unix_socket_directories='{folder}'",
    )
    existing = postgres(
        "psql",
        "-h",
        str(folder),
        "-U",
        ROLE,
        "-d",
        "postgres",
        "-Atc",
        "SELECT datname FROM pg_database",
    ).split()
    for database in DATABASES:
        if database not in existing:
            postgres("createdb", "-h", str(folder), "-U", ROLE, database)


def stop_postgres(folder: Path) -> None:
    postgres("pg_ctl", "stop", "-D", str(folder.resolve()), "-m", "fast", check=False)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_config(folder: Path) -> Path:
    """The basic-auth app's settings: users in PostgreSQL, READ for every signed-in user."""
    if not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        raise StageError(
            "--auth needs the admin's password in MLFLOW_AUTH_ADMIN_PASSWORD "
            "(there is no default; it is used when the admin user is first created)"
        )
    path = folder / "basic_auth.ini"
    path.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {database_uri(folder / 'postgres', 'mlflow_auth')}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def secret_key(folder: Path) -> str:
    """The auth app's CSRF key: made once, kept (mode 0600), the same for every worker and restart."""
    path = folder / "secret_key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def server_command(args, folder: Path) -> list[str]:
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        database_uri(folder / "postgres", "mlflow"),
        "--artifacts-destination",
        str((folder / "artifacts").resolve()),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    if args.auth:
        cmd += ["--app-name", "basic-auth"]
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", args.allowed_hosts]
    return cmd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: loopback only)"
    )
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA, help="PostgreSQL cluster and artifacts")
    parser.add_argument("--auth", action="store_true", help="MLflow's basic-auth app")
    parser.add_argument("--allowed-hosts", help="Host headers to accept, e.g. mlflow.example.com")
    parser.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without --auth"
    )
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.auth and not args.insecure:
        raise StageError(
            f"--host {args.host} would expose a server that anyone on the network can "
            "write to: add --auth (and TLS in front), or --insecure to do it anyway"
        )
    folder = args.data
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    if args.auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(folder))
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secret_key(folder))
    start_postgres(folder / "postgres")
    server = None
    try:
        server = subprocess.Popen(server_command(args, folder), env=env, start_new_session=True)
        print(
            f"mlflow server: http://{args.host}:{args.port} (PostgreSQL in {folder / 'postgres'}, "
            f"artifacts in {folder / 'artifacts'}); Ctrl-C stops both",
            flush=True,
        )
        if server.wait() != 0:
            raise StageError(
                f"mlflow server exited with code {server.returncode} (its error is above)"
            )
    except KeyboardInterrupt:
        pass
    finally:
        if server and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
        stop_postgres(folder / "postgres")


if __name__ == "__main__":
    from stages import errors

    errors.run(main)
