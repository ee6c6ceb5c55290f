"""The kubernetes actuator: patches a Deployment's scale subresource (official client).

Service ``s`` maps to Deployment ``s`` in ``--namespace`` unless a mapping
says otherwise. The client is synchronous; its calls run in a thread, each with
a request timeout (a hung API server must not stall the leader), and whatever
the client raises comes out as a MeshError (the scaler logs it and goes on).

Each patch is conditional on the replica count read (or last patched) this
term: a JSON patch whose ``test`` op the API server checks against the stored
object, so a leader that stalled after its leadership check cannot overwrite a
count another leader has set since.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from registry.errors import ConfigError, MeshError

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S = 5.0
_FRESH_FOR = 10.0  # seconds a count read or patched is trusted without reading it again

JSON_PATCH = "application/json-patch+json"  # RFC 6902: a list of operations
# What the API server answers (422, reason Invalid) when a JSON patch does not apply to
# the stored object: apiserver's jsonPatcher passes the patch library's error
# ("testing value /spec/replicas failed: test failed") to NewGenericServerResponse,
# which keeps only this fixed message for a 422. Our patch can only fail to apply
# through its test op: /spec always exists, and a test that passed means the replaced
# member does too. A failed field validation is a 422 Invalid with another message.
_PATCH_DID_NOT_APPLY = "the server rejected our request due to an error in our request"


def load_apps_api(*, host: str | None = None) -> Any:
    """AppsV1Api from in-cluster config, else ~/.kube/config; ``host`` overrides both."""
    from kubernetes import client, config

    if host is not None:
        configuration = client.Configuration()
        configuration.host = host
        return client.AppsV1Api(client.ApiClient(configuration))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise ConfigError(
                f"no kubernetes configuration (in-cluster or ~/.kube/config): {exc}"
            ) from exc
    return client.AppsV1Api()


class KubernetesActuator:
    def __init__(
        self,
        api: Any,
        *,
        namespace: str = "default",
        deployments: Mapping[str, str] | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not request_timeout > 0:
            raise ConfigError(f"request timeout must be > 0 seconds, got {request_timeout}")
        self._api = api
        self._namespace = namespace
        self._deployments = dict(deployments or {})
        # (connect, read) per attempt; the client retries idempotent reads a few times.
        self._request_timeout = (request_timeout, request_timeout)
        self._clock = clock
        # spec.replicas as last read or patched this term, and when. Trusted for
        # _FRESH_FOR seconds only: a stalled old leader's patch can still land when
        # its test op matches the count we decided to keep (and so sent nothing),
        # and an operator may scale by hand; either is seen at the next read.
        self._known: dict[str, tuple[int, float]] = {}

    def deployment(self, service: str) -> str:
        return self._deployments.get(service, service)

    def replicas(self, service: str) -> int | None:
        known = self._known.get(service)
        return None if known is None else known[0]

    def new_term(self) -> None:
        # Another leader may have scaled since: read each Deployment again before acting.
        self._known.clear()

    async def read(self, service: str) -> int:
        """The Deployment's desired replicas (spec of its scale subresource)."""
        scale = await self._call("read", self._api.read_namespaced_deployment_scale, service)
        replicas = int(scale.spec.replicas or 0)
        self._known[service] = (replicas, self._clock())
        return replicas

    async def apply(self, service: str, replicas: int) -> None:
        known = self._known.get(service)
        if known is None or self._clock() - known[1] > _FRESH_FOR:
            current = await self.read(service)
        else:
            current = known[0]
        if current == replicas:
            return
        try:
            scale = await self._call(
                "patch",
                self._api.patch_namespaced_deployment_scale,
                service,
                replicas_patch(current, replicas),
                # The client would pick this for a list body anyway; say it outright.
                _content_type=JSON_PATCH,
            )
        except MeshError as exc:
            if not _patch_did_not_apply(exc.__cause__):
                raise
            # Read the count in force now, so the next decision starts from it (if
            # this read fails too, _call has forgotten the count: the next apply reads).
            now = ""
            with contextlib.suppress(MeshError):
                now = f" (now {await self.read(service)})"
            raise MeshError(
                f"kubernetes scale of deployment {self._namespace}/{self.deployment(service)}"
                f" to {replicas} refused: its replicas were changed by someone else since"
                f" they were read as {current}{now}"
            ) from exc.__cause__
        self._known[service] = (int(scale.spec.replicas or 0), self._clock())
        log.info(
            "%s: deployment %s/%s scaled %d -> %d",
            service,
            self._namespace,
            self.deployment(service),
            current,
            replicas,
        )

    async def _call(self, what: str, method: Any, service: str, *body: Any, **options: Any) -> Any:
        name = self.deployment(service)
        try:
            return await asyncio.to_thread(
                method,
                name,
                self._namespace,
                *body,
                _request_timeout=self._request_timeout,
                **options,
            )
        except Exception as exc:  # the client's edge: API errors, urllib3's, bad answers
            self._known.pop(service, None)
            raise MeshError(
                f"kubernetes {what} of deployment {self._namespace}/{name} failed: {_describe(exc)}"
            ) from exc

    async def aclose(self) -> None:
        client = getattr(self._api, "api_client", None)
        if client is not None:
            client.close()


def replicas_patch(current: int, replicas: int) -> list[dict[str, Any]]:
    """A JSON patch (RFC 6902) setting the scale's spec.replicas to ``replicas`` only if
    it is still ``current``.

    The API server applies it to the object as stored, inside the same compare-and-swap
    as the write, so the test holds at the moment of writing, however late the request
    arrives. Not a resourceVersion precondition: the Scale carries the Deployment's
    resourceVersion, which every status update (each pod becoming ready, say) changes,
    so it would conflict all the time with no one else scaling. What the test cannot
    see is ABA: if another writer changes the count away and back to ``current`` since
    we read it, the patch applies over its second write (and stands until that writer,
    trusting its own cache, next patches a different count).
    """
    if current == 0:
        # autoscaling/v1 omits replicas 0 ("replicas,omitempty"): the stored Scale has
        # "spec": {}, and a test of /spec/replicas against 0 would always fail. The
        # spec holds nothing else, so "spec is empty" is "replicas is 0"; then add it.
        return [
            {"op": "test", "path": "/spec", "value": {}},
            {"op": "add", "path": "/spec/replicas", "value": replicas},
        ]
    return [
        {"op": "test", "path": "/spec/replicas", "value": current},
        {"op": "replace", "path": "/spec/replicas", "value": replicas},
    ]


def _patch_did_not_apply(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the API server's answer to a JSON patch whose test failed."""
    from kubernetes.client.exceptions import ApiException

    if not isinstance(exc, ApiException) or exc.status != 422:
        return False
    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
    try:
        status = json.loads(body or "")
    except ValueError:
        return False
    return (
        isinstance(status, dict)
        and status.get("reason") == "Invalid"
        and status.get("message") == _PATCH_DID_NOT_APPLY
    )


def _describe(exc: BaseException) -> str:
    """One line about a client error: "404 Not Found", "connection refused", ..."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import MaxRetryError

    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        exc = exc.reason  # the last attempt's error, not the URL and retry count
    text = " ".join(str(exc).split())
    # urllib3 puts the connection object first: "<...Connection object at 0x...>: Failed to ..."
    text = text.split(">: ", 1)[-1]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
