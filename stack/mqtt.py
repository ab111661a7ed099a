"""MQTT broker: Mosquitto (Debian package) with a generated config, or amqtt as fallback.

``Mosquitto(workdir, secure=True)`` is the fleet's secure mode (docs/security.md): one TLS
listener (the fleet CA from ``stack.pki``, TLS 1.2+, no client certificates), no
anonymous access, and a credential store the coordinator manages: ``auth="passwd"`` (the
default) Mosquitto's password file with a ``%u`` ACL file (``schemas.passwd``; the
coordinator rewrites the file in batches and signals a reload), ``auth="dynsec"`` the
dynamic-security plugin (``schemas.dynsec``; over MQTT, but its cost per enrolment grows
with the fleet). ``credentials`` is then the coordinator's. The default (insecure) mode
is a plain anonymous listener on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

from schemas import dynsec, passwd
from schemas.mqtt_auth import MqttCredentials
from schemas.topics import DEFAULT_ROOT
from stack.errors import StackError
from stack.pki import LOCAL_HOSTS, TlsFiles, ensure_tls, private_dir, write_private
from stack.procs import ManagedProcess, ProcessServer

DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


# where a secure broker keeps its credentials: Mosquitto's password file + a %u ACL file
# (the default: enrolment cost linear in the fleet) or the dynamic-security plugin
AUTH_STORES = ("passwd", "dynsec")


def mosquitto_binary() -> str | None:
    for cand in ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        found = shutil.which(cand)
        if found:
            return found
    return None


def dynsec_plugin() -> str | None:
    """The dynamic-security plugin shipped with Mosquitto 2 (Debian: package mosquitto)."""
    return next((p for p in DYNSEC_PLUGIN_PATHS if os.path.isfile(p)), None)


async def mqtt_ping(
    host: str, port: int, *, timeout: float = 3.0, credentials: MqttCredentials | None = None
) -> None:
    """Connect and disconnect a client (raises when the broker does not answer or refuses
    the credentials); with ``credentials``, over TLS verified against their CA."""
    import aiomqtt

    auth = credentials.client_kwargs() if credentials else {}
    async with aiomqtt.Client(host, port, identifier="", timeout=timeout, **auth):
        pass


def _refused(exc: Exception) -> bool:
    """The broker answered CONNECT with a refusal (not: not listening yet)."""
    from aiomqtt.exceptions import MqttConnectError

    return isinstance(exc, MqttConnectError)


def _wait(
    name: str,
    proc: ManagedProcess,
    host: str,
    port: int,
    timeout: float,
    credentials: MqttCredentials | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StackError(f"MQTT ({name}) exited during start: {proc.log_tail()}")
        try:
            asyncio.run(mqtt_ping(host, port, credentials=credentials))
            return
        except Exception as exc:
            if credentials is not None and _refused(exc):  # plugins load before listeners
                raise StackError(
                    f"MQTT ({name}) on {host}:{port} refused {credentials.username}'s "
                    f"credentials ({exc})"
                ) from exc
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise StackError(f"MQTT ({name}): not ready on {host}:{port} after {timeout:.0f}s ({last})")


class _Broker(ProcessServer):
    credentials: MqttCredentials | None = None

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        _wait(self.impl, self.proc, self.host, self.port, timeout, self.credentials)


class Mosquitto(_Broker):
    """Mosquitto on 127.0.0.1:``port``.

    ``secure=True`` writes, below ``workdir``: ``tls/`` (0700: ``ca.pem``, ``ca.key``,
    ``server.pem``, ``server.key``; the CA is reused when present) and ``dynsec/`` (0700:
    ``dynamic-security.json``, the plugin's state, and ``coordinator.secret``, both
    0600; reused when present, so enrolled devices survive a restart).
    """

    impl = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        *,
        max_connections: int = -1,
        secure: bool = False,
        auth: str = "passwd",
        hosts: tuple[str, ...] = LOCAL_HOSTS,
        topic_roots: tuple[str, ...] = (DEFAULT_ROOT,),
        share: Mosquitto | None = None,
    ) -> None:
        """``share``: a broker of the same fleet (started first) whose mode, fleet CA,
        password file, ACL and coordinator credential this one uses too; its pid joins
        that broker's pid file (one per line), so one enrolment is one file write and a
        SIGHUP to each of them (``coordinator.broker_passwd``)."""
        if share is not None:
            secure, auth = share.secure, share.auth
            hosts, topic_roots = share.hosts, share.topic_roots
            if secure and auth != "passwd":
                raise StackError("MQTT: several brokers share one credential store only as a "
                                 "password file (--broker-auth passwd)")  # fmt: skip
        binary = mosquitto_binary()
        if binary is None:
            raise StackError("MQTT: mosquitto not installed (apt-get install -y mosquitto)")
        if auth not in AUTH_STORES:
            raise StackError(f"MQTT: auth must be one of {', '.join(AUTH_STORES)}, not {auth!r}")
        plugin = dynsec_plugin() if secure and auth == "dynsec" else None
        if secure and auth == "dynsec" and plugin is None:
            raise StackError(
                "MQTT: secure mode needs Mosquitto 2's dynamic-security plugin "
                f"(mosquitto_dynamic_security.so, looked in {', '.join(DYNSEC_PLUGIN_PATHS)})"
            )
        super().__init__(workdir)
        self.binary = binary
        self.max_connections = max_connections
        self.secure: bool = secure
        self.hosts: tuple[str, ...] = hosts
        # the deployments' MQTT namespaces (schemas.topics)
        self.topic_roots: tuple[str, ...] = topic_roots
        self.auth: str = auth
        self.plugin = plugin
        self.tls: TlsFiles | None = None
        self.dynsec_file = workdir / "dynsec" / "dynamic-security.json"
        # auth="passwd": the broker's password file (the coordinator owns it), its static
        # ACL file, and the broker's pid (the coordinator signals a reload)
        self.passwd_file = workdir / "auth" / "passwd"
        self.acl_file = workdir / "auth" / "acl"
        self.pid_file = workdir / "auth" / "mosquitto.pid"
        self.share = share
        if share is not None:
            self.passwd_file, self.acl_file = share.passwd_file, share.acl_file
            self.pid_file = share.pid_file

    @property
    def store_file(self) -> Path:
        """The credential store: the dynsec plugin's JSON, or the password file."""
        return self.dynsec_file if self.auth == "dynsec" else self.passwd_file

    def _secure_lines(self) -> list[str]:
        """Prepare the CA, server certificate and credential store; the config lines."""
        if self.share is not None:  # the first broker's CA, credential and files
            assert self.share.tls is not None
            self.tls, self.credentials = self.share.tls, self.share.credentials
        else:
            self.tls = ensure_tls(self.workdir / "tls", self.hosts)
            self.credentials = MqttCredentials(
                dynsec.COORDINATOR_USER, self._coordinator_secret(), self.tls.ca_cert
            )
        if self.share is not None:
            store = [f"password_file {self.passwd_file}", f"acl_file {self.acl_file}"]
        elif self.auth == "dynsec":
            assert self.plugin is not None
            store = [f"plugin {self.plugin}", f"plugin_opt_config_file {self.dynsec_file}"]
        else:
            self.acl_file.write_text(passwd.acl_text(self.topic_roots))
            store = [f"password_file {self.passwd_file}", f"acl_file {self.acl_file}"]
        return [
            "per_listener_settings false",
            "allow_anonymous false",
            *store,
            f"listener {self.port} 127.0.0.1",
            f"cafile {self.tls.ca_cert}",
            f"certfile {self.tls.server_cert}",
            f"keyfile {self.tls.server_key}",
            "require_certificate false",
            "tls_version tlsv1.2",
        ]

    @property
    def secret_file(self) -> Path:
        """The coordinator's broker password (0600)."""
        return self.store_file.parent / "coordinator.secret"

    def _coordinator_secret(self) -> str:
        secret, store = self.secret_file, self.store_file
        private_dir(secret.parent)
        have_conf, have_secret = store.exists(), secret.exists()
        if have_conf and have_secret:
            return secret.read_text().strip()
        if have_conf or have_secret:
            raise StackError(
                f"MQTT: only one of {store.name} and {secret.name} is in "
                f"{secret.parent}; remove the other to start with a fresh credential store"
            )
        password = dynsec.new_password()
        write_private(secret, password.encode())
        # owner-only: it holds password hashes
        if self.auth == "dynsec":
            config = json.dumps(dynsec.initial_config(password, roots=self.topic_roots),
                                indent=1).encode()  # fmt: skip
        else:
            config = passwd.initial(password, dynsec.new_password())
        write_private(store, config)
        return password

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        listen = (
            self._secure_lines()
            if self.secure
            else [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        )
        conf.write_text(
            "\n".join(
                [
                    *listen,
                    "persistence false",
                    f"max_connections {self.max_connections}",
                    "max_queued_messages 100000",
                    "max_inflight_messages 200",
                    "set_tcp_nodelay true",
                    "log_dest stdout",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "connection_messages false",
                    # Stay root when started as root: dropping privileges would clear
                    # PR_SET_PDEATHSIG and let the broker outlive a killed parent.
                    *(["user root"] if os.geteuid() == 0 else []),
                    "",
                ]
            )
        )
        self._launch([self.binary, "-c", str(conf)], "mosquitto.log")
        if self.secure and self.auth == "passwd":  # mosquitto writes one only as a daemon
            assert self.proc is not None
            pids = self.pid_file.read_text() if self.share is not None else ""
            write_private(self.pid_file, f"{pids}{self.proc.pid}\n".encode())


class Amqtt(_Broker):
    """amqtt's broker in a child Python process: the pip-only fallback."""

    impl = "amqtt"

    def __init__(self, workdir: Path) -> None:
        try:
            import amqtt  # noqa: F401
        except ImportError as exc:
            raise StackError(
                "MQTT: neither mosquitto nor amqtt is installed "
                "(apt-get install -y mosquitto, or pip install 'fedfleet[fallback]')"
            ) from exc
        super().__init__(workdir)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        argv = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
        self._launch(argv, "amqtt.log")
