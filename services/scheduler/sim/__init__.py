"""Offline tools of the scheduler: cluster simulator, workloads, experiments, decision-log replay, plots.

They import the scheduler's policies and worker views; the scheduler service never imports them.
Used by ``caraserve simulate`` (launcher/), the routing benchmarks (bench/routing/) and tests."""
