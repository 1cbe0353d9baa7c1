"""The gpu_worker's performance profiler: timed steps fitted into the perf model the scheduler prices with.

Also the cold-start and CPU-prefill profiles, the profile cache and the backend choice.
Imported by the gpu_worker service, ``caraserve profile`` (launcher/), bench/ and tests only."""
