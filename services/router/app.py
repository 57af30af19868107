"""The Router process: wires config to servicers. Behaviour lands with issue #5."""

from __future__ import annotations

from services.common.placeholder import PlaceholderApp
from services.common.services import NODES, ROUTER
from services.router.config import RouterConfig


class RouterApp(PlaceholderApp):
    def __init__(self, config: RouterConfig) -> None:
        lands_with = "lands with issue #5, the Router service"
        super().__init__([(ROUTER, lands_with), (NODES, lands_with)])
        self.config = config
