"""The engine benchmark (``python -m bench.engine``): CaraServe's engine against transformers and vLLM.

Workload, configurations, one runner per engine (each run in a fresh process), metrics, report, plot.
This file imports nothing, as ``python -m bench.engine.configs`` also runs in the vLLM venv."""
