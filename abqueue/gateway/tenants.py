"""API keys and the tenants they belong to. Keys are held only as SHA-256 digests, so neither a
log line nor a memory dump of the gateway shows one."""

from __future__ import annotations

import hashlib
import logging
import stat
from pathlib import Path

import yaml

from abqueue.errors import UsageError

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the one tenant of a gateway without --api-keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Tenants:
    """Which tenant an `Authorization: Bearer KEY` header belongs to. Without keys every caller is
    the anonymous tenant."""

    def __init__(self, keys: dict[str, str] | None = None):
        """keys: API key -> tenant; None serves one anonymous tenant."""
        self.anonymous = keys is None
        self._tenants = {_digest(k): t for k, t in (keys or {}).items()}

    @classmethod
    def from_file(cls, path: Path) -> Tenants:
        """A YAML mapping of tenant to its key or keys (`acme: [sk-1, sk-2]`), as mounted from a
        Kubernetes Secret."""
        if not path.is_file():
            raise UsageError(
                f"--api-keys {path} is not a file; write one mapping each tenant to its keys, e.g. acme: [sk-...]"
            )
        if path.stat().st_mode & stat.S_IROTH:
            log.warning("%s is readable by every user on this machine; chmod 600 it", path)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UsageError(f"--api-keys {path} is not YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict) or not raw:
            raise UsageError(f"--api-keys {path} must map each tenant to its key or keys, e.g. acme: [sk-...]")
        keys: dict[str, str] = {}
        for tenant, given in raw.items():
            for key in [given] if isinstance(given, str) else given if isinstance(given, list) else [None]:
                if not isinstance(key, str) or len(key) < 16:
                    # The key itself is never echoed: the tenant names where to look.
                    raise UsageError(
                        f"--api-keys {path}: tenant {tenant!r} has a key that is not a string of at least 16 characters"
                    )
                if key in keys and keys[key] != str(tenant):
                    raise UsageError(f"--api-keys {path}: tenants {keys[key]!r} and {tenant!r} share a key")
                keys[key] = str(tenant)
        return cls(keys)

    def tenant(self, authorization: str | None) -> str | None:
        """The caller's tenant, or None for a missing or unknown key."""
        if self.anonymous:
            return ANONYMOUS
        if not authorization or not authorization.startswith("Bearer "):
            return None
        return self._tenants.get(_digest(authorization.removeprefix("Bearer ").strip()))
