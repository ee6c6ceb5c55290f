"""The one error root of ringmesh; subclasses are named for what the caller does next."""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error ringmesh raises on purpose."""


class ConfigError(MeshError):
    """Bad input from a user: a flag, a name, a policy. Fix the input and retry."""


class InvalidName(ConfigError):
    """A service name or instance id that is not allowed."""


class RecordError(MeshError):
    """A value in etcd that does not parse. Skip it and log it; never fatal."""


class EtcdUnavailable(MeshError):
    """etcd did not answer in time or the connection broke. Retry later."""


class EtcdError(MeshError):
    """etcd refused a request for a reason other than being unreachable."""


class PermissionDenied(EtcdError):
    """etcd refused: the user's roles do not allow it. Fix the roles, not the retry."""


class RevisionCompacted(MeshError):
    """A watch asked for a revision etcd has compacted away. Re-list, then re-watch."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted below {compacted_revision}")
        self.compacted_revision = compacted_revision


class WriteConflict(MeshError):
    """A compare-and-swap kept losing to other writers of the same key. Try again later."""


class LeaseLost(MeshError):
    """The lease expired or was revoked: grant a new one and put the records again."""


class UnknownService(MeshError):
    """No registered service matches the call (gRPC UNIMPLEMENTED)."""


class NoLiveInstance(MeshError):
    """The service is known but has no instance that can take the call (UNAVAILABLE)."""


class NotLeader(MeshError):
    """This process does not lead (any more): stop acting as leader, campaign again."""
