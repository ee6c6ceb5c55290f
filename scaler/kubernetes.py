"""The kubernetes actuator: patches a Deployment's scale subresource (official client).

Service ``s`` maps to Deployment ``s`` in ``--namespace`` unless a mapping
says otherwise. The client is synchronous; its calls run in a thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from registry.errors import ConfigError, MeshError

log = logging.getLogger(__name__)


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
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._deployments = dict(deployments or {})
        self._known: dict[str, int] = {}

    def deployment(self, service: str) -> str:
        return self._deployments.get(service, service)

    def replicas(self, service: str) -> int | None:
        return self._known.get(service)

    async def read(self, service: str) -> int:
        """The Deployment's desired replicas (spec of its scale subresource)."""
        scale = await self._call("read", self._api.read_namespaced_deployment_scale, service)
        replicas = int(scale.spec.replicas or 0)
        self._known[service] = replicas
        return replicas

    async def apply(self, service: str, replicas: int) -> None:
        current = self._known.get(service)
        if current is None:
            current = await self.read(service)
        if current == replicas:
            return
        body = {"spec": {"replicas": replicas}}
        scale = await self._call(
            "patch", self._api.patch_namespaced_deployment_scale, service, body
        )
        self._known[service] = int(scale.spec.replicas or 0)
        log.info(
            "%s: deployment %s/%s scaled %d -> %d",
            service,
            self._namespace,
            self.deployment(service),
            current,
            replicas,
        )

    async def _call(self, what: str, method: Any, service: str, *body: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        name = self.deployment(service)
        try:
            return await asyncio.to_thread(method, name, self._namespace, *body)
        except ApiException as exc:
            self._known.pop(service, None)
            raise MeshError(
                f"kubernetes {what} of deployment {self._namespace}/{name} failed: {exc.status} {exc.reason}"
            ) from exc

    async def aclose(self) -> None:
        client = getattr(self._api, "api_client", None)
        if client is not None:
            client.close()
