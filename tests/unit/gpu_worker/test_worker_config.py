"""WorkerConfig's bounded queue option."""

from __future__ import annotations

import pytest

from services.gpu_worker.worker_config import WorkerConfig
from shared.config import ConfigError, from_env


def test_max_queued_defaults_bounded_and_comes_from_the_environment():
    assert WorkerConfig().max_queued == 64
    assert from_env(WorkerConfig, {"CARASERVE_MAX_QUEUED": "0"}).max_queued == 0
    with pytest.raises(ConfigError):
        WorkerConfig(max_queued=-1)
