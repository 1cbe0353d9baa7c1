"""``python -m services.scheduler``: one scheduler replica configured from CARASERVE_* variables."""

import os

from services.scheduler.service import SchedulerService
from shared.bus import run_service

if __name__ == "__main__":
    run_service(SchedulerService.from_environ(os.environ).start)
