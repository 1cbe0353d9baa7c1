"""``python -m services.gpu_worker``: one gpu_worker configured from CARASERVE_* variables."""

import os

from services.gpu_worker.service import GpuWorkerService
from shared.bus import run_service

if __name__ == "__main__":
    run_service(GpuWorkerService.from_environ(os.environ).start)
