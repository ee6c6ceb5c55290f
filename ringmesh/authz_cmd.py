"""`ringmesh authz allow|deny SERVICE CALLER`, `ringmesh authz show SERVICE [--json]`.

Who may call a service, stored at ``authz/<service>`` (registry/authz.py).
Each change is one compare-and-swap, retried on a conflict: two operators
changing the same service at once both get their change in.
"""

from __future__ import annotations

import argparse
import json
import sys

from registry.authz import AuthzRecord, change_authz, read_authz
from registry.errors import InvalidName, MeshError, RecordError
from registry.etcd import EtcdClient
from registry.keys import KeyLayout, validate_service


def describe_rule(service: str, record: AuthzRecord | None) -> str:
    """`authz show`'s one line about ``service``."""
    if record is None:
        return f"{service}: no authz record: every mesh peer may call it"
    if not record.allow:
        return f"{service}: allows no caller: every call to it is denied"
    return f"{service}: allows {', '.join(sorted(record.allow))}"


async def authz_command(client: EtcdClient, layout: KeyLayout, args: argparse.Namespace) -> int:
    service = validate_service(args.service)
    try:
        if args.action == "show":
            return _show(service, await read_authz(client, layout, service), as_json=args.json)
        try:
            caller = validate_service(args.caller)
        except InvalidName as exc:
            raise InvalidName(f"CALLER: {exc}") from exc
        if args.action == "allow":
            record, _wrote = await change_authz(
                client, layout, service, lambda current: (current or AuthzRecord()).allowing(caller)
            )
        else:
            record, _wrote = await change_authz(
                client, layout, service, lambda current: _deny(service, current, caller)
            )
    except RecordError as exc:
        raise MeshError(
            f"{exc}; sidecars deny every caller of {service!r} until it is fixed "
            f"(rewrite it with etcdctl, or `etcdctl del {layout.authorization(service)}` "
            "to let every peer in)"
        ) from exc
    sys.stdout.write(record.to_json().decode() + "\n")
    if not record.allow:
        print(f"ringmesh authz: {describe_rule(service, record)}", file=sys.stderr)
    return 0


def _deny(service: str, current: AuthzRecord | None, caller: str) -> AuthzRecord:
    if current is None:
        # An allow list cannot say "everyone but CALLER", and an empty one would cut
        # off every caller: refuse rather than guess.
        raise MeshError(
            f"no authz record for {service!r}: every mesh peer may call it; "
            f"`ringmesh authz allow {service} CALLER` starts a list of the callers it accepts"
        )
    return current.denying(caller)


def _show(service: str, record: AuthzRecord | None, *, as_json: bool) -> int:
    if as_json:
        allow = None if record is None else sorted(record.allow)
        sys.stdout.write(json.dumps({"service": service, "allow": allow}) + "\n")
    else:
        sys.stdout.write(describe_rule(service, record) + "\n")
    return 0
