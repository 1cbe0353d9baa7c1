"""``python -m services.gateway``: one gateway replica configured from CARASERVE_* variables."""

import os

from services.gateway.service import GatewayService
from shared.bus import run_service

if __name__ == "__main__":
    run_service(GatewayService.from_environ(os.environ).start)
