"""`ringmesh policy set|get|delete SERVICE`: how a service scales, stored at ``policy/<service>``."""

from __future__ import annotations

import argparse
import json
import sys

from registry.errors import MeshError, RecordError
from registry.etcd import EtcdClient
from registry.keys import KeyLayout, validate_service
from registry.scaling import Policy


def policy_from_args(args: argparse.Namespace) -> Policy:
    """Validate the flags into a Policy (ConfigError, i.e. exit 2, on bad input)."""
    return Policy(
        min_replicas=args.min,
        max_replicas=args.max,
        metric=args.metric,
        target=args.target,
        tolerance=args.tolerance,
        scale_up_window_s=args.scale_up_window,
        scale_down_window_s=args.scale_down_window,
        mode=args.mode,
    )


async def policy_command(client: EtcdClient, layout: KeyLayout, args: argparse.Namespace) -> int:
    service = validate_service(args.service)
    key = layout.policy(service)
    if args.action == "set":
        policy = policy_from_args(args)
        await client.put(key, policy.to_json(), lease=None)  # a policy outlives any process
        sys.stdout.write(policy.to_json().decode() + "\n")
        return 0
    if args.action == "get":
        found = await client.get(key)
        if found is None:
            raise MeshError(f"no policy for service {service!r}")
        try:
            policy = Policy.from_json(found.value)
        except RecordError as exc:
            raise MeshError(f"policy for {service!r} at {key} does not parse: {exc}") from exc
        sys.stdout.write(json.dumps(json.loads(policy.to_json()), indent=2, sort_keys=True) + "\n")
        return 0
    if not await client.delete(key):
        raise MeshError(f"no policy for service {service!r}")
    return 0
