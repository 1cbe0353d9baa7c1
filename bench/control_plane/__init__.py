"""The control-plane benchmark (``python -m bench.control_plane``): gateway and scheduler cost per request.

Load clients (HTTP, NATS), the bare-NATS transport floor, an OTLP span sink, process CPU, the report.
It starts a LocalStack (launcher/) and imports shared/; only tests import it."""
