"""The benchmarks, one package per benchmark: engine/, cold_start/, control_plane/ and routing/.

Each keeps its workload, runner and report together and writes to bench/results/ (paths.py).
Benchmarks may import services, launcher/ and shared/; only tests import bench/."""
