"""TLS certificates and SuperNode keys: make them (`corolla keys`), and check them before anything starts.

Everything here raises `SecurityError` with one line that names the problem and the
fix; the commands print it and exit. Torch-free and Flower-free: the `cryptography`
package (a dependency of Flower) does the work, imported on use.

- `make_ca(out, hosts)`: a CA (`ca.crt`, `ca.key`; kept when it exists) and a server
  certificate signed by it (`server.crt`, `server.key`) whose subjectAltName holds every
  host the SuperNodes dial plus 127.0.0.1 and localhost (`flwr` reaches the SuperLink's
  Control API on loopback with the same certificate).
- `make_node_key(out, name)`: a SuperNode's ECDSA P-384 key pair in OpenSSH format
  (`NAME`, `NAME.pub`), the format `flower-supernode --auth-supernode-private-key` and
  `flwr supernode register` read.
- `check_server_tls`, `check_root_certificate`, `check_node_key`, `read_public_key`:
  the checks of `corolla superlink/server/client/nodes`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from pathlib import Path
from typing import Any

#: validity of what `corolla keys ca` issues
CA_DAYS = 3650
SERVER_DAYS = 825
#: the loopback names every server certificate carries (the Control API is reached there)
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


class SecurityError(ValueError):
    """A certificate, key or transport setting is unusable; the message names the problem and the fix."""


def is_loopback(address: str) -> bool:
    """True for 127.x.x.x, ::1 and localhost (with or without a port)."""
    host = split_host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(address: str) -> str:
    """'10.0.0.5:9092' → '10.0.0.5'; '[::1]:9092' → '::1'; 'name' → 'name'."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address


def is_wildcard(host: str) -> bool:
    """True for 0.0.0.0 / :: (listen on every interface: no one host name to check)."""
    return host in ("0.0.0.0", "::", "")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner alone from its first byte, then move it into place.

    The bytes go to a new file created with O_EXCL and mode 0600 (never a moment with wider
    permissions, never through a link planted at the name) and are renamed over `path`.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _san_entries(hosts: list[str]) -> list[Any]:
    from cryptography import x509

    names: list[Any] = []
    for h in dict.fromkeys([*hosts, *LOOPBACK_NAMES]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def make_ca(out: Path, hosts: list[str], *, days: int = SERVER_DAYS, not_before: dt.datetime | None = None) -> dict[str, Path]:
    """Write ca.crt/ca.key (kept if present) and a server.crt/server.key for `hosts` signed by that CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not hosts:
        raise SecurityError("name the server with --host (the IP address or DNS name the SuperNodes dial).")
    for h in hosts:
        if is_wildcard(h):
            raise SecurityError(f"--host {h!r} is a listen-everywhere address, not a name SuperNodes dial; pass the "
                                "server's IP address or DNS name.")
    out.mkdir(parents=True, exist_ok=True)
    start = not_before or _now() - dt.timedelta(minutes=5)
    ca_crt, ca_key = out / "ca.crt", out / "ca.key"
    if ca_key.exists() and ca_crt.exists():
        key = serialization.load_pem_private_key(ca_key.read_bytes(), None)
        ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corolla CA")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(start)
              .not_valid_after(start + dt.timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
              .sign(key, hashes.SHA384()))
        _write_private(ca_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        ca_crt.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA384()))
    _write_private(out / "server.key", server_key.private_bytes(serialization.Encoding.PEM,
                                                                serialization.PrivateFormat.TraditionalOpenSSL,
                                                                serialization.NoEncryption()))
    (out / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return {"ca": ca_crt, "ca_key": ca_key, "cert": out / "server.crt", "key": out / "server.key"}


def make_node_key(out: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write a SuperNode's ECDSA P-384 key pair `out/NAME` (private, 0600) and `out/NAME.pub` (OpenSSH)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name or name.startswith("."):
        raise SecurityError(f"node name {name!r} must be a plain file name, e.g. site1.")
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / name, out / f"{name}.pub"
    if private.exists() and not force:
        raise SecurityError(f"{private} exists; a registered node would lose its identity: pick another name, or "
                            "pass --force to replace it (then register the new .pub).")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(pub + f" corolla-{name}\n".encode())
    return private, public


def fingerprint(public_key: Any) -> str:
    """`SHA256:...` of a public key, as `ssh-keygen -l` prints it."""
    from cryptography.hazmat.primitives import serialization

    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def fingerprint_pem(pem: bytes) -> str:
    """Fingerprint of a PEM SubjectPublicKeyInfo (the form the SuperLink logs refused keys in)."""
    from cryptography.hazmat.primitives import serialization

    return fingerprint(serialization.load_pem_public_key(pem))


def _nist_ec(key: Any) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec

    return isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)) and \
        key.curve.name in ("secp256r1", "secp384r1", "secp521r1")


def read_public_key(path: str | Path) -> tuple[Any, str]:
    """Load a SuperNode's OpenSSH public key for registration; return it and its fingerprint."""
    from cryptography.hazmat.primitives import serialization

    p = Path(path).expanduser()
    if not p.is_file():
        raise SecurityError(f"public key {p} not found; make a node's key pair with `corolla keys node DIR NAME` "
                            "and register its NAME.pub.")
    data = p.read_bytes()
    if b"PRIVATE KEY" in data:
        raise SecurityError(f"{p} is a private key: send the server only the node's NAME.pub file, and keep the "
                            "private key on the node.")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError) as e:
        raise SecurityError(f"{p} is not an OpenSSH public key ({e}); register the NAME.pub written by "
                            "`corolla keys node` (or `ssh-keygen -t ecdsa -b 384`).") from None
    if not _nist_ec(key):
        raise SecurityError(f"{p} is not an ECDSA key on a NIST curve, which Flower requires; make one with "
                            "`corolla keys node DIR NAME` (or `ssh-keygen -t ecdsa -b 384`).")
    return key, fingerprint(key)


def check_node_key(path: str | Path) -> str:
    """Check a SuperNode's private key before the SuperNode starts; return its fingerprint."""
    from cryptography.hazmat.primitives import serialization

    p = Path(path).expanduser()
    if not p.is_file():
        raise SecurityError(f"--auth-key {p} not found; make a key pair with `corolla keys node DIR NAME`, pass the "
                            "private key file here and have the server's operator register NAME.pub.")
    data = p.read_bytes()
    if p.suffix == ".pub" or data.startswith((b"ecdsa-", b"ssh-")):
        raise SecurityError(f"--auth-key {p} is a public key; pass the private key (the same path without .pub).")
    try:
        key = serialization.load_ssh_private_key(data, None)
    except Exception as e:  # ValueError, UnsupportedAlgorithm, password-protected keys
        raise SecurityError(f"--auth-key {p} is not an unencrypted OpenSSH private key ({e}); make one with "
                            "`corolla keys node DIR NAME`.") from None
    if not _nist_ec(key):
        raise SecurityError(f"--auth-key {p} is not an ECDSA key on a NIST curve, which Flower requires; make one "
                            "with `corolla keys node DIR NAME`.")
    return fingerprint(key.public_key())


def _load_cert(path: str | Path, flag: str) -> Any:
    from cryptography import x509

    p = Path(path).expanduser()
    if not p.is_file():
        raise SecurityError(f"{flag} {p} not found; make the CA and server certificate with "
                            "`corolla keys ca DIR --host SERVER`.")
    try:
        return x509.load_pem_x509_certificate(p.read_bytes())
    except ValueError:
        raise SecurityError(f"{flag} {p} is not a PEM certificate; pass the .crt written by `corolla keys ca`.") from None


def _check_dates(cert: Any, flag: str, path: str | Path) -> None:
    now = _now()
    if cert.not_valid_after_utc < now:
        raise SecurityError(f"{flag} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; issue a new one with "
                            "`corolla keys ca DIR --host SERVER` (nodes keep their registered keys).")
    if cert.not_valid_before_utc > now:
        raise SecurityError(f"{flag} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                            "check this machine's clock.")


def check_root_certificate(path: str | Path) -> None:
    """Check a SuperNode's --root-certificates file: a PEM certificate that has not expired."""
    _check_dates(_load_cert(path, "--root-certificates"), "--root-certificates", path)


def _san_hosts(cert: Any) -> set[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


def check_server_tls(ca: str | Path, cert: str | Path, key: str | Path, hosts: list[str]) -> None:
    """Check the SuperLink's CA, certificate and key: present, current, signed by that CA, matching, naming `hosts`."""
    from cryptography.hazmat.primitives import serialization

    ca_cert = _load_cert(ca, "--ssl-ca")
    server = _load_cert(cert, "--ssl-cert")
    _check_dates(ca_cert, "--ssl-ca", ca)
    _check_dates(server, "--ssl-cert", cert)
    try:
        server.verify_directly_issued_by(ca_cert)
    except Exception:  # InvalidSignature, ValueError, TypeError
        raise SecurityError(f"--ssl-cert {cert} was not issued by --ssl-ca {ca}; pass the CA that signed it (both are "
                            "written together by `corolla keys ca DIR --host SERVER`).") from None
    kp = Path(key).expanduser()
    if not kp.is_file():
        raise SecurityError(f"--ssl-key {kp} not found; pass the server.key written beside --ssl-cert.")
    try:
        private = serialization.load_pem_private_key(kp.read_bytes(), None)
    except (ValueError, TypeError) as e:
        raise SecurityError(f"--ssl-key {kp} is not an unencrypted PEM private key ({e}); pass the server.key written "
                            "beside --ssl-cert by `corolla keys ca`.") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            server.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise SecurityError(f"--ssl-key {kp} does not belong to --ssl-cert {cert}; pass the key written beside it.")
    names = _san_hosts(server)
    missing = [h for h in dict.fromkeys([*hosts, "127.0.0.1"]) if not is_wildcard(h) and h not in names]
    if missing:
        raise SecurityError(f"--ssl-cert {cert} does not name {', '.join(missing)} (it names "
                            f"{', '.join(sorted(names)) or 'nothing'}); SuperNodes dialling there, and `flwr` on "
                            "127.0.0.1, would reject it: reissue it with `corolla keys ca DIR --host SERVER`.")
