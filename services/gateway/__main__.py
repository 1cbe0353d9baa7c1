"""``python -m services.gateway``: one gateway replica configured from CARASERVE_* variables."""

import os

from services.gateway.service import GatewayService
from shared.bus import service_main

if __name__ == "__main__":
    service_main(lambda: GatewayService.from_environ(os.environ).start)
