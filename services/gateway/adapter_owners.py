"""Who may change which adapter: the gateway's record of adapter owners.

Loading, re-registering and unloading an adapter is allowed only to its owner tenant or
to an admin (``Tenancy.is_admin``: the ``admin_tenants``, and everyone in open mode). The
rules, checked before anything is sent to a worker:

* any tenant may register a new name, and becomes its owner;
* an existing name may be re-registered or unloaded only by its owner. The operator's
  adapters (the adapter directory's, or names the workers report that no tenant
  registered here) have no owner tenant: only admins may change them;
* a folder may be registered under a new name only by a tenant that may use every adapter
  already served from it, so an alias never opens someone else's weights. The adapter
  directory's sub-folder ``X`` serves the operator's adapter ``X``;
* without an adapter root at the gateway (``--adapter-dir``), folders cannot be compared,
  so only admins may register.

Refusals are ``permission_denied`` (403); unloading an adapter the tenant may not even use
is ``model_not_found`` (404), as if it did not exist. The record lives in this gateway's
memory: replicas do not share it, and it starts empty (runtime adapters then count as the
operator's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.gateway.fleet_view import FleetView
from services.gateway.tenancy import Tenancy
from shared.peft_adapter import CONFIG_FILE
from shared.schemas import ServiceError


@dataclass(frozen=True)
class Owned:
    """A runtime-registered adapter: the tenant that registered it and its resolved folder."""

    tenant: str
    folder: Path | None


class AdapterOwners:
    """Owner tenants of runtime-registered adapters, and the checks that use them."""

    def __init__(self, tenancy: Tenancy, fleet: FleetView, root: Path | None) -> None:
        self.tenancy, self.fleet, self.root = tenancy, fleet, root
        self._owned: dict[str, Owned] = {}

    def owner(self, name: str) -> str | None:
        """The tenant that registered ``name`` here, or None (the operator's, or unknown)."""
        owned = self._owned.get(name)
        return owned.tenant if owned else None

    def known(self, name: str) -> bool:
        """Whether ``name`` is an adapter already (registered here, in a worker's state, or in the adapter root)."""
        return name in self._owned or self.fleet.has(name) or self._root_folder(name) is not None

    def claim(self, tenant: str, name: str, folder: Path | None) -> bool:
        """Check that ``tenant`` may register ``name`` at ``folder``, and record it as the owner of a
        new name. Returns whether the name was new (see :meth:`release`); raises ServiceError."""
        if not self.tenancy.is_admin(tenant):
            self._check_may_load(tenant, name, folder)
        if self.known(name):
            return False
        self._owned[name] = Owned(tenant, folder)
        return True

    def release(self, name: str) -> None:
        """Forget ``name``'s owner: its registration failed, or it was unloaded."""
        self._owned.pop(name, None)

    def check_unload(self, tenant: str, name: str) -> None:
        """Raise ServiceError unless ``tenant`` may unload ``name``."""
        if self.tenancy.is_admin(tenant) or self.owner(name) == tenant:
            return
        if not self.known(name) or not self.tenancy.may_use(tenant, name):
            raise ServiceError("model_not_found", f"the model {name!r} does not exist")
        raise ServiceError("permission_denied", f"only the owner of adapter {name!r} or an admin may unload it")

    def _check_may_load(self, tenant: str, name: str, folder: Path | None) -> None:
        if self.known(name) and self.owner(name) != tenant:
            raise ServiceError("permission_denied", f"the adapter name {name!r} is taken by another tenant or the "
                                                    "operator; only its owner or an admin may re-register it")
        if folder is None:
            raise ServiceError("permission_denied", "only an admin may load adapters on this gateway: it has no "
                                                    "--adapter-dir, so it cannot check who owns a folder")
        for other in self._served_from(folder):
            if other != name and not self.tenancy.may_use(tenant, other):
                raise ServiceError("permission_denied", "that folder already serves an adapter this tenant may not "
                                                        "use; ask its owner or an admin")

    def _served_from(self, folder: Path) -> list[str]:
        """The adapters served from ``folder``: registered here, or the root's own sub-folder."""
        names = [name for name, owned in self._owned.items() if owned.folder == folder]
        if self.root is not None and folder.parent == self.root and _holds_adapter(folder):
            names.append(folder.name)
        return names

    def _root_folder(self, name: str) -> Path | None:
        """The adapter root's direct sub-folder called ``name``, if it holds an adapter."""
        if self.root is None or "/" in name or name in (".", ".."):
            return None
        folder = self.root / name
        return folder if _holds_adapter(folder) else None


def _holds_adapter(folder: Path) -> bool:
    try:
        return (folder / CONFIG_FILE).is_file()
    except OSError:  # e.g. a name longer than the file system allows
        return False
