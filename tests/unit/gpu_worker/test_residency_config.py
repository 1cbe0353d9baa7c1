"""ResidencyConfig validation and its generated CLI flags."""

from __future__ import annotations

import argparse

import pytest

from services.gpu_worker.residency.config import ResidencyConfig
from shared.config import ConfigError, add_arguments, from_namespace


def test_flags_round_trip(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser, ResidencyConfig)
    ns = parser.parse_args(["--adapter-dir", str(tmp_path), "--cold-start", "cached", "--device-adapter-bytes", "1000",
                            "--emulate-link-gbps", "2.5", "--emulate-link-latency-ms", "3", "--load-groups", "4"])
    cfg = from_namespace(ResidencyConfig, ns)
    assert (cfg.cold_start, cfg.device_adapter_bytes, cfg.emulate_link_gbps, cfg.load_groups) == ("cached", 1000, 2.5, 4)
    assert cfg.emulates_link and not ResidencyConfig().emulates_link


@pytest.mark.parametrize("bad", [dict(cold_start="cpu_magic"), dict(device_adapter_fraction=0.0),
                                 dict(emulate_link_gbps=-1.0), dict(load_groups=0), dict(adapter_dir="/no/such/dir"),
                                 dict(host_adapter_bytes=-1)])
def test_invalid_values(bad):
    with pytest.raises(ConfigError):
        ResidencyConfig(**bad)
