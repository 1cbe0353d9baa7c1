"""A gpu_worker's own profile: made by a quick grid while it serves, published by digest, refused when wrong."""

from __future__ import annotations

import pytest

from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.profiling.profile_cache import model_digest, profile_digest, profiles_dir
from services.gpu_worker.service import GpuWorkerService
from services.gpu_worker.worker_config import WorkerConfig
from shared import subjects
from shared.native_ops import cache_root
from shared.config import ConfigError
from shared.perf_model import PerfModel, current_device_name
from shared.schemas import SubmitAck
from shared.schemas.profile import ProfileReply, ProfileRequest
from tests.service.helpers import client, wait_until
from tests.service.test_gpu_worker_service import Inbox, submit_for


def other_models_profile(path, tiny_model_dir) -> str:
    PerfModel.from_coefficients("mbgmv", {"const": 1.0}, {"const": 1.0}, model="Llama-2-7b", model_digest="0" * 16,
                                device_name=current_device_name("cpu"), dtype="float32").save(path)
    return str(path)


@pytest.mark.slow  # a real quick profile of the tiny model in a child process: about 6 s on two cores
@pytest.mark.timeout(240)
async def test_a_worker_without_a_cached_profile_makes_one_while_serving(nats_server, stack, tiny_model_dir,
                                                                         tiny_adapters, tmp_path, monkeypatch):
    # the child profiles into an empty cache, but loads the native kernels the session built (not a 100 s rebuild)
    (tmp_path / "torch_extensions").symlink_to(cache_root() / "torch_extensions", target_is_directory=True)
    monkeypatch.setenv("CARASERVE_CACHE_DIR", str(tmp_path))
    config = WorkerConfig(worker_id="w1", nats_url=nats_server.url, model=str(tiny_model_dir), auto_profile=True,
                          adapters=tuple(f"{n}={p}" for n, p in tiny_adapters.items()), state_interval_s=0.05)
    worker = GpuWorkerService(config, EngineConfig(dtype="float32", device="cpu", backend="auto"))
    await worker.start(stack)
    assert worker.state().profile == "pending"
    bus = await client(stack, nats_server.url)
    inbox = await Inbox(bus, bus.nc.new_inbox()).open()
    await bus.request(subjects.worker_submit("w1"), submit_for("served-while-pending", inbox.subject), SubmitAck, 5)
    await wait_until(inbox.done.is_set, timeout_s=30)  # it serves while its profile is pending
    await wait_until(lambda: worker.state().profile != "pending", timeout_s=200)
    state = worker.state()
    reply = await bus.request(subjects.worker_profile("w1"), ProfileRequest(digest=state.profile), ProfileReply, 5)
    assert reply.digest == state.profile == profile_digest(reply.profile)
    profile = PerfModel.from_text(reply.profile)
    assert profile.info.grid == "quick" and profile.info.model_digest == model_digest(tiny_model_dir)
    assert set(profile.cold_start) == {"host", "disk"} and profile.cpu_prefill is not None
    assert profile.backend == state.backend  # backend auto serves with the family its profile chose
    cached = sorted(p.name.rsplit("-", 1)[1] for p in profiles_dir().glob("*.json"))
    assert cached == ["bgmv.json", "mbgmv.json"]


async def test_a_profile_for_another_model_is_refused_with_one_line(nats_server, stack, tiny_model_dir, tmp_path):
    path = other_models_profile(tmp_path / "other.json", tiny_model_dir)
    config = WorkerConfig(worker_id="w1", nats_url=nats_server.url, model=str(tiny_model_dir), profile=path)
    worker = GpuWorkerService(config, EngineConfig(dtype="float32", device="cpu"))
    with pytest.raises(ConfigError) as refused:
        await worker.start(stack)
    line = str(refused.value)
    assert "\n" not in line and line.startswith("profile refused: ")
    assert f"was made for model digest '{'0' * 16}', not '{model_digest(tiny_model_dir)}'" in line
