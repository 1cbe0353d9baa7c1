"""Code used by more than one service: subjects, the NATS bus, config, telemetry, the perf model, adapters.

Wire schemas are in shared/schemas/. Every package may import shared/; shared/ imports no
service, launcher/ or bench/ module, so it stays the one common ground."""
