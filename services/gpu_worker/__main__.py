"""``python -m services.gpu_worker``: one gpu_worker configured from CARASERVE_* variables."""

import os

from services.gpu_worker.service import GpuWorkerService
from shared.bus import service_main

if __name__ == "__main__":
    service_main(lambda: GpuWorkerService.from_environ(os.environ).start)
