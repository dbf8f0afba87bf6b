"""Consortium credentials, made with `cryptography`:

- the consortium CA (self-signed) and the coordinator's TLS certificate signed by it: sites
  check the coordinator against the CA certificate, so TLS is on for every connection;
- each site's SuperNode key pair (EC P-384, OpenSSH format as Flower expects). The private key
  never leaves the site; its public key is what the coordinator enrols, and the SuperLink then
  accepts only SuperNodes that prove they hold an enrolled key.

Private keys are written with mode 0600, and never over an existing file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
VALIDITY_DAYS = 825


class CredentialsError(RuntimeError):
    pass


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CredentialsError(f"{path} exists; refusing to overwrite a private key (move it away first)") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spine-fl consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


@dataclass(frozen=True)
class ServerCredentials:
    ca_cert: Path
    cert: Path
    key: Path


LOOPBACK_HOSTS = ["localhost", "127.0.0.1"]  # the coordinator reaches its own SuperLink there


def create_server_credentials(out_dir: Path, hosts: list[str]) -> ServerCredentials:
    """A new consortium CA and a coordinator certificate valid for `hosts` (names or IPs) and loopback."""
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))
    existing = [p for p in (out_dir / CA_CERT, out_dir / CA_KEY, out_dir / SERVER_CERT, out_dir / SERVER_KEY)
                if p.exists()]
    if existing:
        raise CredentialsError(f"{existing[0]} exists; refusing to replace the consortium's credentials "
                               "(move the folder away first)")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("spine-fl consortium CA"))
               .issuer_name(_name("spine-fl consortium CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
            .add_extension(_alt_names(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = ServerCredentials(out_dir / CA_CERT, out_dir / SERVER_CERT, out_dir / SERVER_KEY)
    _write_private(out_dir / CA_KEY, _pem_key(ca_key))
    _write_private(out.key, _pem_key(key))
    out.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


@dataclass(frozen=True)
class SiteKeys:
    private_key: Path
    public_key: Path


def create_site_keys(out_dir: Path, site: str) -> SiteKeys:
    """The site's SuperNode identity. Send only the .pub file to the coordinator."""
    key = ec.generate_private_key(ec.SECP384R1())
    keys = SiteKeys(out_dir / f"{site}_supernode_key", out_dir / f"{site}_supernode_key.pub")
    if keys.public_key.exists():
        raise CredentialsError(f"{keys.public_key} exists; refusing to replace the site's key pair")
    _write_private(keys.private_key, key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
    keys.public_key.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                              serialization.PublicFormat.OpenSSH) + b"\n")
    return keys


def load_site_public_key(path: Path) -> bytes:
    """An enrolled site's public key as the PEM bytes Flower registers; a clear error if unusable."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise CredentialsError(f"{path}: site public key not found") from None
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"{path}: not an OpenSSH public key ({exc}); create it with `spine-fl enroll`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CredentialsError(f"{path}: not an EC key; create it with `spine-fl enroll`")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """"sha256:<hex>" of a ledger-signing public key's raw bytes: what the coordinator pins and every
    run result records."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def ledger_key_fingerprint(path: Path) -> str:
    """The fingerprint of a site's ledger public key file (`site_ed25519.pub`), for enrolment."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise CredentialsError(f"{path} not found: the site finds its ledger key in its state folder "
                          "(site_ed25519.pub; `spine-fl ledger key` creates and prints it)") from None
    except ValueError as exc:
        raise CredentialsError(f"{path} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CredentialsError(f"{path} is not an Ed25519 public key (the site's ledger key is site_ed25519.pub)")
    return key_fingerprint(key)
