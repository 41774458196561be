"""The MCP identity broker: an OAuth 2.1 authorization server in front of MCP servers.

Importing the package loads no server code, so MCP servers can import the resource kit
(``broker.resource``) with PyJWT and cryptography alone. The application factory lives in
:mod:`broker.app`; ``from broker import create_app`` still works and loads it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Broker, create_app, get_broker

__all__ = ["Broker", "create_app", "get_broker"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'broker' has no attribute {name!r}")
