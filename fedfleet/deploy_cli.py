"""`fedfleet deploy init DIR`: the secrets and broker files a secure deployment starts from.

What `fedfleet stack up` makes for itself on loopback, for a deployment (the compose file
in ``deploy/compose``; a Kubernetes Secret made from the same directory), written once and
reused: running it again keeps the CA, the keys and the broker's password file (so
enrolled devices stay enrolled) and only issues a new server certificate for ``--host``.

    DIR/tls/ca.pem, ca.key         the fleet CA (devices get ca.pem at enrolment)
    DIR/tls/server.pem, server.key  the broker's and the REST API's certificate (--host names)
    DIR/mqtt/passwd                the broker's password file: the coordinator and the probe
                                   user; the coordinator adds and removes devices
    DIR/mqtt/acl                   the broker's ACL (``schemas.passwd.acl_text``: %u patterns)
    DIR/mqtt/coordinator.secret    the coordinator's broker password
    DIR/keys/task-token.key        the upload-token key every coordinator shares
    DIR/admin.token                the REST admin token

Every secret is owner-only (0600, directories 0700); ``--owner UID:GID`` hands the tree to
the user the broker and the services run as (Mosquitto's image runs as 1883:1883).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path

from coordinator.tasks import load_task_key
from schemas import dynsec, passwd
from stack.errors import StackError
from stack.pki import ensure_tls, private_dir, write_private


def init(directory: Path, hosts: list[str], owner: tuple[int, int] | None = None) -> dict[str, str]:
    """Write (or complete) ``directory``; returns what is where."""
    directory = private_dir(Path(directory))
    tls = ensure_tls(directory / "tls", hosts)
    mqtt = private_dir(directory / "mqtt")
    secret, pw_file = mqtt / "coordinator.secret", mqtt / "passwd"
    if secret.exists() != pw_file.exists():
        raise StackError(f"deploy: only one of {secret.name} and {pw_file.name} is in {mqtt}; "
                         "remove the other to start with a fresh credential store")  # fmt: skip
    if not secret.exists():
        password = dynsec.new_password()
        write_private(secret, password.encode())
        write_private(pw_file, passwd.initial(password, dynsec.new_password()))
    (mqtt / "acl").write_text(passwd.acl_text())
    task_key = directory / "keys" / "task-token.key"
    private_dir(task_key.parent)
    load_task_key(task_key)  # created once, never replaced
    token = directory / "admin.token"
    if not token.exists():
        write_private(token, secrets.token_urlsafe(32).encode())
    if owner is not None:
        for root, dirs, files in os.walk(directory):
            for name in [".", *dirs, *files]:
                os.chown(Path(root) / name, *owner)
    return {"ca": str(tls.ca_cert), "server_cert": str(tls.server_cert),
            "server_key": str(tls.server_key), "passwd": str(pw_file),
            "acl": str(mqtt / "acl"), "coordinator_secret": str(secret),
            "task_key": str(task_key), "admin_token": str(token)}  # fmt: skip


def _owner(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--owner wants UID:GID, got {text!r}") from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("deploy", help="files for a secure deployment (deploy/compose)")
    ds = p.add_subparsers(dest="deploy_cmd", required=True)
    i = ds.add_parser("init", help="write the fleet CA, broker credentials and keys to DIR")
    i.add_argument("dir", type=Path)
    i.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a name or address the broker and REST API are reached at "
                        "(repeat; default: localhost 127.0.0.1)")  # fmt: skip
    i.add_argument("--owner", type=_owner, metavar="UID:GID",
                   help="chown the tree (the broker's and services' user)")  # fmt: skip
    i.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    hosts = args.host or ["localhost", "127.0.0.1"]
    print(json.dumps(init(args.dir, hosts, args.owner), indent=1))
    return 0
