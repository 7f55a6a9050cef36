"""Throwaway TLS certificates and SuperNode keys for trying a secure deployment.

`make_tls(dir)` writes a self-signed CA (ca.crt, ca.key) and a SuperLink certificate it signs
(server.pem, server.key) valid for the given host names / IP addresses. SuperNodes verify the
SuperLink with ca.crt (`--root-certificates`). `make_node_key(path)` writes an ECDSA P-384 key
pair in OpenSSH format (path, path.pub): the SuperNode signs its requests with the private key
(`--auth-supernode-private-key`) and the SuperLink (`--enable-supernode-auth`) accepts only
nodes whose public key was registered (`flwr supernode register path.pub <connection>`).

For production use certificates from your own CA; these are for tests and walkthroughs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path


def make_tls(folder: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
             days: int = 30) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora throwaway CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = [_san(h) for h in hosts]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    _private(folder / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    _private(folder / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    return folder


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return path, pub


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)
