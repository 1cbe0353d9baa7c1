"""Adapter residency of the gpu_worker: disk -> host store -> device cache, loaders, cold-start strategies.

Also the worker's side of CPU-assisted prefill (the shared-memory exchange with the cpu_prefill pool).
Imported by the gpu_worker engine and profiling, launcher/, bench/ and tests; never by another service."""
