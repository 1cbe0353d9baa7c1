"""The routing benchmarks, one module each, run as ``python -m bench.routing.<module>``.

sched_sweep and sched_sweep_hetero (simulated SLO attainment), decision (policy cost), simulator_speed,
live_routing (a live stack, then replay) and synthetic_profile; they use the scheduler's policies and sim/."""
