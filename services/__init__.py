"""The four CaraServe services: gateway, scheduler, gpu_worker and cpu_prefill, one package each.

They talk only over NATS (subjects in shared/subjects.py) or shared memory, never by importing
each other; only launcher/, bench/ and tests/ import a service, to wire or measure it."""
