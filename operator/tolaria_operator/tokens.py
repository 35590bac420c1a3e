"""Run tokens (R10.5): the bearer token of a run's sidecar is an HMAC of the run's identity
(namespace, name, UID) under one operator key, so the operator computes it and never reads
it back.

Why: reaching a sidecar then needs no Secret read in the run's namespace, so the operator's
RBAC there grants Secrets `create` only; a Secret that happens to carry a run's name is never
read, reused or mounted. The key lives in one Secret of the operator's own namespace
(`tokens.key_secret`), created with random bytes the first time it is needed; that is the
only Secret the operator ever reads, by name. Without a known namespace (the operator started
by hand outside a pod) the key is random per process, which a warning says.

The same key also derives the CA of the sidecars' control port (`control_tls`, `RunTokens.ca`).

Used by the reconciler (the Secret each attempt mounts) and the sidecar connector (the token
each call carries). Everything but `RunTokens.key` is pure; that reads or creates the key
once per process, under a lock, never before the first handler needs it (kopf logs in after
the start-up handlers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from typing import Any

from tolaria_operator.config import TokenSettings
from tolaria_operator.control_tls import ControlCA
from tolaria_operator.errors import ObjectExists, TokenKeyInvalid
from tolaria_operator.protocols import Kube
from tolaria_operator.resources import KEY_SECRETS, MANAGED_BY_LABEL, MANAGER

logger = logging.getLogger(__name__)

KEY_BYTES = 32
"""Length of a generated key, and the least a stored one may have (HMAC-SHA256's block)."""
KEY_FIELD = "key"
DERIVATION = b"tolaria.dev/run-token/v1"
"""Domain separation: the key signs nothing else under this prefix."""


def derive_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    """The token of run `namespace/name` with `uid`: URL-safe base64 of HMAC-SHA256. A run
    deleted and created again under the same name has another UID, hence another token."""
    parts = [DERIVATION, *(part.encode("utf-8") for part in (namespace, name, uid))]
    message = b"\0".join(parts)
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def key_secret(name: str, namespace: str, key: bytes) -> dict[str, Any]:
    """The Secret that keeps the operator's key."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGER},
        },
        "data": {KEY_FIELD: base64.b64encode(key).decode("ascii")},
    }


def read_key(secret: Mapping[str, Any], where: str) -> bytes:
    """The key in the Secret; `TokenKeyInvalid` when it has none or a short one."""
    encoded = (secret.get("data") or {}).get(KEY_FIELD)
    try:
        key = base64.b64decode(encoded or "", validate=True)
    except ValueError as err:
        raise TokenKeyInvalid(where, f"data.{KEY_FIELD} is not base64") from err
    if len(key) < KEY_BYTES:
        raise TokenKeyInvalid(
            where, f"data.{KEY_FIELD} has {len(key)} bytes, at least {KEY_BYTES} are needed"
        )
    return key


class RunTokens:
    """The operator's key, loaded once, and the tokens derived from it."""

    def __init__(
        self, kube: Kube, settings: TokenSettings, namespace: str, *, key: bytes | None = None
    ) -> None:
        self._kube = kube
        self._settings = settings
        self._namespace = namespace
        self._key = key
        self._ca: ControlCA | None = None
        self._lock = asyncio.Lock()

    async def key(self) -> bytes:
        """The key: from the Secret (created when missing), else random for this process."""
        async with self._lock:
            if self._key is None:
                self._key = await self._load()
            return self._key

    async def token(self, namespace: str, name: str, uid: str) -> str:
        return derive_token(await self.key(), namespace, name, uid)

    async def ca(self) -> ControlCA:
        """The control-port CA derived from the same key (`control_tls`), built once."""
        key = await self.key()
        if self._ca is None:
            self._ca = ControlCA(key)
        return self._ca

    async def _load(self) -> bytes:
        if not self._namespace:
            logger.warning(
                "the operator's namespace is unknown: run tokens use a key that lives in "
                "memory, so after a restart the operator cannot reach sidecars started before"
            )
            return secrets.token_bytes(KEY_BYTES)
        name, namespace = self._settings.key_secret, self._namespace
        where = f"Secret {namespace}/{name}"
        found = await self._kube.get(KEY_SECRETS, namespace, name)
        if found is not None:
            return read_key(found, where)
        key = secrets.token_bytes(KEY_BYTES)
        try:
            await self._kube.create(KEY_SECRETS, namespace, key_secret(name, namespace, key))
        except ObjectExists:  # another operator made it a moment ago: use that one
            found = await self._kube.get(KEY_SECRETS, namespace, name)
            if found is None:
                raise TokenKeyInvalid(where, "created elsewhere and deleted again") from None
            return read_key(found, where)
        logger.info("created the run-token key in %s", where)
        return key
