"""The etcd key layout, as in the contract (ARCHITECTURE.md, "etcd layout")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import InvalidName

DEFAULT_PREFIX = "/ringmesh/v1"

_SERVICE_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Instance ids end up in keys, logs and metric labels: keep them printable and bounded.
_INSTANCE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?")


def validate_service(name: str) -> str:
    """Return ``name`` if it is a DNS label (the contract's service names), else raise."""
    if len(name) > 63 or not _SERVICE_RE.fullmatch(name):
        raise InvalidName(
            f"invalid service name {name!r}: must be a DNS label "
            "(lowercase letters, digits and '-', at most 63 characters, "
            "starting and ending with a letter or digit)"
        )
    return name


def validate_instance_id(instance_id: str) -> str:
    if not _INSTANCE_RE.fullmatch(instance_id):
        raise InvalidName(
            f"invalid instance id {instance_id!r}: use letters, digits, '.', '_' and '-', "
            "at most 128 characters, starting and ending with a letter or digit"
        )
    return instance_id


@dataclass(frozen=True)
class KeyLayout:
    """Builds and parses every key ringmesh writes under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise InvalidName(
                f"invalid prefix {self.prefix!r}: must start with '/' and not end with '/'"
            )

    @property
    def instances(self) -> str:
        return f"{self.prefix}/instances/"

    def service_instances(self, service: str) -> str:
        return f"{self.instances}{validate_service(service)}/"

    def instance(self, service: str, instance_id: str) -> str:
        return f"{self.service_instances(service)}{validate_instance_id(instance_id)}"

    def parse_instance(self, key: str) -> tuple[str, str]:
        """Split an instances key into (service, instance id); raise InvalidName if malformed."""
        if not key.startswith(self.instances):
            raise InvalidName(f"{key!r} is not under {self.instances!r}")
        service, sep, instance_id = key[len(self.instances) :].partition("/")
        if not sep:
            raise InvalidName(f"{key!r} has no instance id")
        return validate_service(service), validate_instance_id(instance_id)

    def load(self, service: str, instance_id: str) -> str:
        return f"{self.prefix}/load/{validate_service(service)}/{validate_instance_id(instance_id)}"

    @property
    def loads(self) -> str:
        return f"{self.prefix}/load/"

    @property
    def policies(self) -> str:
        return f"{self.prefix}/policy/"

    def policy(self, service: str) -> str:
        return f"{self.policies}{validate_service(service)}"

    @property
    def targets(self) -> str:
        return f"{self.prefix}/targets/"

    def target(self, service: str) -> str:
        return f"{self.targets}{validate_service(service)}"

    @property
    def authorizations(self) -> str:
        return f"{self.prefix}/authz/"

    def authorization(self, service: str) -> str:
        """``authz/<service>``: who may call ``service`` (registry/authz.py)."""
        return f"{self.authorizations}{validate_service(service)}"

    def election(self, name: str = "scaler") -> str:
        """``election/<name>/``: every candidate's key is directly under it."""
        return f"{self.prefix}/election/{validate_service(name)}/"

    def parse_last(self, key: str, under: str) -> str:
        """The service name at the end of a ``policy/``, ``targets/`` or ``authz/`` key."""
        if not key.startswith(under):
            raise InvalidName(f"{key!r} is not under {under!r}")
        return validate_service(key[len(under) :])

    def parse_load(self, key: str) -> tuple[str, str]:
        """Split a ``load/`` key into (service, instance id)."""
        if not key.startswith(self.loads):
            raise InvalidName(f"{key!r} is not under {self.loads!r}")
        service, sep, instance_id = key[len(self.loads) :].partition("/")
        if not sep:
            raise InvalidName(f"{key!r} has no instance id")
        return validate_service(service), validate_instance_id(instance_id)
