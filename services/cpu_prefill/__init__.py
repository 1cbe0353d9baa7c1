"""The cpu_prefill service: a pool of pinned CPU processes computing LoRA delta slices for one gpu_worker.

They read activations from and write deltas to the worker's shared-memory ring; health goes over NATS.
It may import shared/ only; launcher/, bench/ and tests may import its pool; no service does."""
