"""Auth and tenancy: API keys map to tenants, and each tenant may use only its adapters.

Admin tenants (``admin_tenants``) may also load, re-register and unload any adapter; other
tenants only their own (see ``adapter_owners.py``). With no keys configured the gateway is
open: every request belongs to the ``default`` tenant, which may use every adapter and
counts as an admin (anyone who can reach the port administers it).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from shared.schemas import ServiceError

OPEN_TENANT = "default"
ANY_ADAPTER = "*"


class Tenancy:
    """Who a request's API key belongs to, and what that tenant may use."""

    def __init__(self, api_keys: Iterable[str] = (), tenant_adapters: Iterable[str] = (),
                 admin_tenants: Iterable[str] = ()) -> None:
        self._keys = dict(pair.split(":", 1) for pair in api_keys)
        self._admins = frozenset(admin_tenants)
        self._allowed: dict[str, set[str]] = {}
        for pair in tenant_adapters:
            tenant, adapter = pair.split(":", 1)
            self._allowed.setdefault(tenant, set()).add(adapter)

    @property
    def open(self) -> bool:
        """No keys configured: no authentication."""
        return not self._keys

    def authenticate(self, api_key: str | None) -> str:
        """The tenant of ``api_key``; ServiceError ``invalid_api_key`` if it is missing or unknown."""
        if self.open:
            return OPEN_TENANT
        if not api_key:
            raise ServiceError("invalid_api_key", "an API key is required (Authorization: Bearer KEY)")
        for key, tenant in self._keys.items():
            if hmac.compare_digest(key.encode(), api_key.encode()):
                return tenant
        raise ServiceError("invalid_api_key", "incorrect API key provided")

    def is_admin(self, tenant: str) -> bool:
        """Whether ``tenant`` may administer every adapter (always, in open mode)."""
        return self.open or tenant in self._admins

    def grant(self, tenant: str, adapter: str) -> None:
        """Let ``tenant`` use ``adapter`` (it registered it at runtime)."""
        self._allowed.setdefault(tenant, set()).add(adapter)

    def may_use(self, tenant: str, adapter: str | None) -> bool:
        """Whether ``tenant`` may use ``adapter`` (None, the base model, is always allowed)."""
        if adapter is None or self.open:
            return True
        allowed = self._allowed.get(tenant, set())
        return ANY_ADAPTER in allowed or adapter in allowed
