"""The cold-start benchmark (``python -m bench.cold_start``): cached, on_demand, cpu_assist on the MAF trace.

Its workload, seeded random adapters and the shared-memory exchange microbench live here.
It imports the gpu_worker engine and residency, cpu_prefill's pool and launcher/; only tests import it."""
