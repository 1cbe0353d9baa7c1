"""The ``caraserve`` CLI and the local launcher: the one place that wires services together.

Commands (``up``, ``service``, ``batch``, ``generate``, ``profile``, ``simulate``) and the local stack.
It may import services and shared/; bench/ and tests may import it; services never do."""
