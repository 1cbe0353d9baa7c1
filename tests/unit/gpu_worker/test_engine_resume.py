"""A request resumed on another engine (after a worker loss) streams the text the first engine would have.

The tiny model's byte-level tokens often split a character across tokens, so cutting a
request anywhere and resuming it from ``prompt + generated`` with ``resumed_tokens`` must
give, after the text already streamed before the cut, exactly the rest of the undisturbed
run's text, also when stop strings hold text back.
"""

from __future__ import annotations

import pytest

from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.request import EngineRequest, RequestError, SamplingParams

PROMPT = [1, 300, 301, 250, 17]
MAX_TOKENS = 20


def run(engine: LLMEngine, requests: list[EngineRequest]) -> dict[str, list[tuple[list[int], str]]]:
    """Per request, (new token ids, text delta) of each of its outputs, all run together to completion."""
    for request in requests:
        engine.add_request(request)
    outputs: dict[str, list[tuple[list[int], str]]] = {r.request_id: [] for r in requests}
    while engine.has_unfinished():
        for o in engine.step():
            outputs[o.request_id].append((o.new_token_ids, o.text_delta))
    return outputs


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine(tiny_model_dir, EngineConfig(dtype="float32", device="cpu"))


@pytest.mark.parametrize("stop", [(), ("zzz-never",)])
def test_resuming_after_any_cut_continues_the_text_seamlessly(engine, stop):
    params = dict(temperature=0, ignore_eos=True, stop=stop)
    name = f"whole{len(stop)}"
    whole = run(engine, [EngineRequest(name, PROMPT, None, SamplingParams(max_tokens=MAX_TOKENS, **params))])[name]
    tokens = [t for ids, _ in whole for t in ids]
    text = "".join(delta for _, delta in whole)
    assert len(tokens) == MAX_TOKENS
    held = [cut for cut in range(1, MAX_TOKENS) if whole[cut - 1][1] == ""]  # a character still incomplete
    assert held
    cuts = sorted({1, MAX_TOKENS // 2, MAX_TOKENS - 1, *held})
    resumed = run(engine, [EngineRequest(f"resume{len(stop)}-{cut}", PROMPT + tokens[:cut], None,
                                         SamplingParams(max_tokens=MAX_TOKENS - cut, **params), resumed_tokens=cut)
                           for cut in cuts])
    for cut in cuts:
        rest = resumed[f"resume{len(stop)}-{cut}"]
        assert [t for ids, _ in rest for t in ids] == tokens[cut:]
        streamed = "".join(delta for _, delta in whole[:cut])
        assert streamed + "".join(delta for _, delta in rest) == text, f"text differs after a cut at {cut}"


def test_resumed_tokens_must_leave_a_prompt(engine):
    with pytest.raises(RequestError, match="resumed_tokens"):
        engine.add_request(EngineRequest("r", [5, 6], None, SamplingParams(max_tokens=2), resumed_tokens=2))
