"""The gateway service: the public edge (NATS API, OpenAI HTTP), tenancy, validation, the chunk relay.

It may import shared/ only; no other service imports it. launcher/ starts it by name
(``python -m services.gateway``, ``caraserve service gateway``); tests import it directly."""
