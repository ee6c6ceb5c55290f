"""etcd roles of least privilege for ringmesh's processes, and bringing etcd in line.

A sidecar of service S reads the whole mesh prefix (it watches ``instances/`` and
``authz/`` and reads ``policy/``) and writes only its own records: ``instances/S/`` and
``load/S/``. The scaler reads the mesh prefix and writes ``targets/`` and the keys of
its election (``election/scaler/``). In etcd 3.5 leases need no permission (grant,
keep-alive), but a put under a lease needs write on the key, and revoking a lease needs
write on every key attached to it: neither process can revoke another's lease. A
transaction needs read on every key it compares, write on every key it puts: the
scaler's fenced writes compare its election key (read, from the prefix) and put a
target. The plan is pure (``plan_role``, ``plan_user``); ``converge`` carries it out.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from registry.errors import ConfigError
from registry.etcd import EtcdClient, Permission
from registry.keys import KeyLayout, validate_service

READ, READWRITE = "read", "readwrite"


def prefix_range_end(prefix: str) -> str:
    """The end of etcd's range of every key starting with ``prefix`` (etcdctl's ``--prefix``).

    UTF-8 sorts as code points do, so the next code point in the last place bounds them.
    """
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def on_prefix(kind: str, prefix: str) -> Permission:
    return Permission(key=prefix, range_end=prefix_range_end(prefix), kind=kind)


@dataclass(frozen=True)
class RoleSpec:
    """A role as ringmesh wants it: exactly these permissions, nothing else."""

    name: str
    permissions: frozenset[Permission]


def _role_name(layout: KeyLayout, *parts: str) -> str:
    # The prefix is part of the name: two meshes in one etcd get roles of their own.
    return "/".join((layout.prefix.lstrip("/"), *parts))


def sidecar_role(layout: KeyLayout, service: str) -> RoleSpec:
    """What the sidecars of ``service`` need: read the mesh, write their own records."""
    validate_service(service)
    return RoleSpec(
        _role_name(layout, "sidecar", service),
        frozenset(
            {
                on_prefix(READ, f"{layout.prefix}/"),
                on_prefix(READWRITE, layout.service_instances(service)),
                on_prefix(READWRITE, f"{layout.loads}{service}/"),
            }
        ),
    )


def scaler_role(layout: KeyLayout) -> RoleSpec:
    """What a scaler needs: read the mesh, write targets and campaign."""
    return RoleSpec(
        _role_name(layout, "scaler"),
        frozenset(
            {
                on_prefix(READ, f"{layout.prefix}/"),
                on_prefix(READWRITE, layout.targets),
                on_prefix(READWRITE, layout.election("scaler")),
            }
        ),
    )


@dataclass(frozen=True, order=True)
class Change:
    """One change to etcd's users and roles; ``str()`` is the line the command prints."""

    action: str  # add-role, grant, revoke, add-user, set-password, grant-role, revoke-role
    subject: str  # the role (add-role, grant, revoke) or the user (the others)
    permission: Permission | None = None
    role: str | None = None

    def __str__(self) -> str:
        kind = "role" if self.action in ("add-role", "grant", "revoke") else "user"
        detail = {
            "add-role": "created",
            "grant": f"granted {self.permission}",
            "revoke": f"revoked {self.permission}",
            "add-user": "created",
            "set-password": "password set",
            "grant-role": f"granted role {self.role}",
            "revoke-role": f"revoked role {self.role}",
        }[self.action]
        return f"{kind} {self.subject}: {detail}"


def plan_role(spec: RoleSpec, current: Collection[Permission] | None) -> list[Change]:
    """The changes that leave the role with exactly ``spec.permissions``.

    etcd keeps one permission per key range: granting on a range it already holds
    replaces that permission's kind, so only ranges ringmesh does not want are revoked.
    """
    if current is None:
        return [Change("add-role", spec.name)] + [
            Change("grant", spec.name, permission=p) for p in sorted(spec.permissions)
        ]
    wanted_ranges = {(p.key, p.range_end) for p in spec.permissions}
    revoke = [p for p in current if (p.key, p.range_end) not in wanted_ranges]
    grant = [p for p in spec.permissions if p not in current]
    return [Change("revoke", spec.name, permission=p) for p in sorted(revoke)] + [
        Change("grant", spec.name, permission=p) for p in sorted(grant)
    ]


def plan_user(
    user: str, role: str, current_roles: Collection[str] | None, *, password_ok: bool
) -> list[Change]:
    """The changes that leave ``user`` with ``role`` and no other, and the given password.

    ``password_ok`` says whether etcd already accepts the password (False when that
    cannot be checked, with authentication off: the password is then set again).
    """
    if current_roles is None:
        return [Change("add-user", user), Change("grant-role", user, role=role)]
    changes = [] if password_ok else [Change("set-password", user)]
    changes += [Change("revoke-role", user, role=r) for r in sorted(current_roles) if r != role]
    if role not in current_roles:
        changes.append(Change("grant-role", user, role=role))
    return changes


def validate_user(user: str) -> str:
    if user == "root":
        raise ConfigError("--user root: root keeps the root role; give this role a user of its own")
    if not user or any(c.isspace() or c == ":" for c in user):
        raise ConfigError(f"invalid etcd user name {user!r}: no spaces or ':', not empty")
    return user


def read_password_file(path: str) -> str:
    """The password on the file's first line (its line end is not part of it)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read password file {path}: {exc}") from exc
    password = text.removesuffix("\n").removesuffix("\r")
    if not password or "\n" in password:
        raise ConfigError(f"password file {path}: expected the password on one line")
    return password


async def converge(client: EtcdClient, spec: RoleSpec, *, user: str, password: str) -> list[Change]:
    """Make etcd hold ``spec`` and ``user`` as wanted; the changes made (none: all was so).

    Idempotent: a second run finds nothing to change. Needs the root role.
    """
    validate_user(user)
    changes = plan_role(spec, await client.role_permissions(spec.name))
    current_roles = await client.user_roles(user)
    password_ok = (
        current_roles is not None
        and await client.auth_enabled()
        and await client.password_matches(user, password)
    )
    changes += plan_user(user, spec.name, current_roles, password_ok=password_ok)
    for change in changes:
        await _apply(client, change, password)
    return changes


async def _apply(client: EtcdClient, change: Change, password: str) -> None:
    if change.action == "add-role":
        await client.add_role(change.subject)
    elif change.action in ("grant", "revoke"):
        assert change.permission is not None
        if change.action == "grant":
            await client.grant_permission(change.subject, change.permission)
        else:
            await client.revoke_permission(change.subject, change.permission)
    elif change.action == "add-user":
        await client.add_user(change.subject, password)
    elif change.action == "set-password":
        await client.change_password(change.subject, password)
    elif change.action in ("grant-role", "revoke-role"):
        assert change.role is not None
        if change.action == "grant-role":
            await client.grant_role(change.subject, change.role)
        else:
            await client.revoke_role(change.subject, change.role)
    else:
        raise AssertionError(f"unknown change {change.action!r}")
