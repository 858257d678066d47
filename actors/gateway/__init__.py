"""The OpenAI-compatible HTTP gateway: HTTP outside, only NATS inside.

It is a client of the node like any agent (prompts into the intake stream, answers from the
event subjects), so it runs in the node's process (``infernode up --openai-port``) or on its
own (``infernode openai``), and several may front one node.
"""

from actors.gateway.http import HttpLimits
from actors.gateway.keys import ApiKeysError, read_api_keys
from actors.gateway.server import Gateway, GatewayBindError, GatewaySettings

__all__ = [
    "ApiKeysError", "Gateway", "GatewayBindError", "GatewaySettings", "HttpLimits",
    "read_api_keys",
]
