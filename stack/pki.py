"""The fleet's local PKI: a CA and a server certificate for the brokers and the REST API.

Made with ``cryptography`` (no ``openssl`` binary). Keys are ECDSA P-256: cheap to verify
on phones and microcontrollers (mbedTLS, BearSSL), accepted by Mosquitto, OpenSSL and
Python's ``ssl``. Private keys are written owner-only (0600) in an owner-only (0700)
directory; a CA key that others can read is refused rather than used.

``ensure_tls(directory)`` is what the stack calls: it reuses ``ca.pem``/``ca.key`` when
both are present (devices that trust the CA keep trusting the broker after a restart) and
issues a fresh server certificate for ``127.0.0.1``/``localhost`` on every call. The rest
are pure functions over key and certificate objects.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stack.errors import PkiError

CA_DAYS = 3650
SERVER_DAYS = 397  # the longest lifetime browsers and Apple platforms accept for a leaf
LOCAL_HOSTS = ("127.0.0.1", "localhost")
_CLOCK_SKEW = dt.timedelta(minutes=5)  # notBefore in the past: a device clock a bit behind


@dataclass(frozen=True)
class TlsFiles:
    """Where the PEM files are: what a broker listener, uvicorn and a client need."""

    ca_cert: Path  # trust anchor for clients (devices, coordinator, tests)
    server_cert: Path  # leaf + nothing else; the CA is not a secret and clients have it
    server_key: Path  # 0600
    ca_key: Path  # 0600; only the stack uses it, to issue server certificates


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_id(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); an ECDSA TLS server signs and agrees keys."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(
    common_name: str = "fedfleet local CA", *, days: int = CA_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(_key_id(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str] = LOCAL_HOSTS,
    *,
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server key and certificate for ``hosts`` (IPs become IP SANs, names DNS SANs)."""
    if not hosts:
        raise PkiError("pki: a server certificate needs at least one host name or IP")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(_key_id(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 (Mosquitto and uvicorn read it without a passphrase prompt)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_dir(path: Path) -> Path:
    """``path`` created if needed and made owner-only (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` as owner-only (0600), atomically (temp file + rename), so
    no reader ever sees a half-written key and the mode holds from the first byte."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing leftover
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)
    return path


def write_public(path: Path, data: bytes) -> Path:
    """Write a certificate (0644: not a secret; clients and other users may read it)."""
    path.write_bytes(data)
    os.chmod(path, 0o644)
    return path


def load_ca(cert_path: Path, key_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in ``cert_path``/``key_path``, checked: key owner-only, key matches the
    certificate, a CA that signed itself, still valid. Anything else is a ``PkiError``."""
    try:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        key_data, cert_data = key_path.read_bytes(), cert_path.read_bytes()
    except OSError as exc:
        raise PkiError(f"pki: cannot read the CA ({exc})") from exc
    if mode & 0o077:
        raise PkiError(
            f"pki: {key_path} is readable by others (mode {mode:04o}); "
            f"chmod 600 it or remove it to generate a new CA"
        )
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
        cert = x509.load_pem_x509_certificate(cert_data)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"pki: {cert_path} or {key_path} is not a PEM CA ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"pki: {key_path} is not an EC key")
    if cert.public_key() != key.public_key():
        raise PkiError(f"pki: {key_path} does not belong to {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.verify_directly_issued_by(cert)
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"pki: {cert_path} is not a self-signed CA ({exc})") from exc
    if not constraints.ca:
        raise PkiError(f"pki: {cert_path} is not a CA certificate")
    if cert.not_valid_after_utc <= _now() + dt.timedelta(days=1):
        raise PkiError(f"pki: the CA in {cert_path} has expired; remove it to make a new one")
    return key, cert


def ensure_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in ``directory`` (``ca.pem``/``ca.key``, reused when both are there, else
    created; only one of them is a ``PkiError``)."""
    private_dir(directory)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert and have_key:
        return load_ca(cert_path, key_path)
    if have_cert or have_key:
        raise PkiError(f"pki: only one of {cert_path.name} and {key_path.name} is in {directory}")
    ca_key, ca_cert = create_ca()
    write_private(key_path, key_pem(ca_key))
    write_public(cert_path, cert_pem(ca_cert))
    return ca_key, ca_cert


def ensure_tls(directory: Path, hosts: Sequence[str] = LOCAL_HOSTS, *,
               ca_dir: Path | None = None) -> TlsFiles:  # fmt: skip
    """The CA in ``ca_dir`` (default ``directory``; reused when present, else created) and
    a new server certificate for ``hosts`` in ``directory``; returns the paths."""
    ca_dir = ca_dir or directory
    ca_key, ca_cert = ensure_ca(ca_dir)
    private_dir(directory)
    files = TlsFiles(
        ca_cert=ca_dir / "ca.pem",
        ca_key=ca_dir / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
    )
    key, cert = issue_server_cert(ca_key, ca_cert, hosts)
    write_private(files.server_key, key_pem(key))
    write_public(files.server_cert, cert_pem(cert))
    return files
