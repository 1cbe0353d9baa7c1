"""The gpu_worker service: the multi-LoRA engine (admission, runner, model, KV cache, LoRA ops) on NATS.

Sub-packages: residency/ (where adapters live, cold starts) and profiling/ (the perf profile).
It may import shared/ only; launcher/, bench/ and tests/ may import its engine; services may not."""
