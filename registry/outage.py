"""OutageLog: say once that etcd went away and once that it came back, not once per retry."""

from __future__ import annotations

import logging
from collections.abc import Callable


class OutageLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        down: Callable[[Exception], str],
        up: Callable[[], str] = lambda: "etcd reachable again",
    ) -> None:
        self._logger = logger
        self._down_message = down
        self._up_message = up
        self.down = False

    def failed(self, exc: Exception) -> None:
        if not self.down:
            self._logger.warning(self._down_message(exc))
            self.down = True

    def recovered(self) -> None:
        if self.down:
            self._logger.info(self._up_message())
            self.down = False
