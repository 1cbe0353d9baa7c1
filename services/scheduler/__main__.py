"""``python -m services.scheduler``: one scheduler replica configured from CARASERVE_* variables."""

import os

from services.scheduler.service import SchedulerService
from shared.bus import service_main

if __name__ == "__main__":
    service_main(lambda: SchedulerService.from_environ(os.environ).start)
