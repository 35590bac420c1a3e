"""TLS of the sidecars' control port (issue 9): a CA derived from the operator's run-token key,
and a server certificate per attempt for the run's Service names.

Why derived and not a second stored Secret: the CA key is HMAC(run-token key, a fixed label)
reduced to a P-256 scalar, so every operator replica, and the operator after a restart, has
the same CA from the one key it already keeps (`tokens`): no further Secret, no further RBAC,
and sidecars started before a restart stay reachable. The CA certificate is rebuilt from the
key with fixed names and dates, so a rebuilt one verifies the certificates issued earlier.
Whoever can read the token key could already call every sidecar; the CA adds no new secret.

Each attempt gets a fresh server key and a certificate naming `<service>`,
`<service>.<namespace>`, `<service>.<namespace>.svc` and `...svc.cluster.local`; both go into
the attempt's Secret next to the token (`pods.token_secret`). The operator's client trusts only
this CA and checks the name `<service>.<namespace>.svc` whatever address it dials
(`sidecar_client`), so a sidecar of another run cannot answer for this one.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tolaria_operator.resources import service_name

CA_DERIVATION = b"tolaria.dev/control-ca/v1"
"""Domain separation from the run tokens derived from the same key."""
CA_NAME = "tolaria control CA"
CA_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
CA_NOT_AFTER = datetime.datetime(2124, 1, 1, tzinfo=datetime.UTC)
"""Fixed, so the CA certificate rebuilt after a restart is the same CA to a verifier."""
SERVER_CERT_DAYS = 3650
"""A server certificate lives as long as its attempt's Secret (owned by the run): training
attempts can run for months, and an expired certificate would cut the operator off from a
healthy run, so its life is not what limits exposure; the per-attempt key and the run's own
token are."""
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Backdating of `not_valid_before`: a node whose clock is a little behind still accepts it."""
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def tls_name(namespace: str, run: str) -> str:
    """The name the operator's client checks in the sidecar's certificate."""
    return f"{service_name(run)}.{namespace}.svc"


def service_names(namespace: str, run: str) -> list[str]:
    """Every DNS name of the run's Service, as its certificate lists them."""
    service = service_name(run)
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


@dataclass(frozen=True)
class ServerCert:
    """One attempt's certificate and private key, PEM."""

    cert_pem: bytes
    key_pem: bytes


class ControlCA:
    """The CA derived from `key`: its certificate (what clients trust) and issuance."""

    def __init__(self, key: bytes) -> None:
        seed = hmac.new(key, CA_DERIVATION, hashlib.sha512).digest()
        scalar = int.from_bytes(seed, "big") % (_P256_ORDER - 1) + 1
        self._key = ec.derive_private_key(scalar, ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])

    @cached_property
    def cert(self) -> x509.Certificate:
        public = self._key.public_key()
        ski = x509.SubjectKeyIdentifier.from_public_key(public)
        return (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(public)
            .serial_number(int.from_bytes(ski.digest[:16], "big") >> 1)
            .not_valid_before(CA_NOT_BEFORE)
            .not_valid_after(CA_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @cached_property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, namespace: str, run: str, *, now: datetime.datetime | None = None
    ) -> ServerCert:
        """A new key and a server certificate for the run's Service names."""
        now = now or datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        names = service_names(namespace, run)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[2])]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=SERVER_CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return ServerCert(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
