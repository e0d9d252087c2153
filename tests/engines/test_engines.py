"""The engine adapters: what each engine answers the gateway (llama-server's /props, /slots and slot
actions; vLLM's and SGLang's /v1/models), which adapter a backend's config gets, how a server the
config does not name is found out, and the seam: a gateway built with an engine of the test's own,
which its health, its saves and the release of an abandoned request all ask, with no socket."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from orchestrator.backends.gateway import build_gateway
from orchestrator.backends.health import State
from orchestrator.config import BackendConfig
from orchestrator.configfile import config_from_dict
from orchestrator.engines.base import Engine, ServerId
from orchestrator.engines.choice import Unnamed, engine_for
from orchestrator.engines.llama_server import LlamaServer, kv_args
from orchestrator.engines.sglang import SGLang
from orchestrator.engines.upstream import UpstreamClient
from orchestrator.engines.vllm import Vllm
from orchestrator.errors import GatewayError, UpstreamUnavailable
from orchestrator.request.release import Released, in_slot, wait_released
from testkit.engine import FakeEngine

PROPS = {"model_path": "/models/m.gguf", "build_info": "b1-abc", "default_generation_settings": {"n_ctx": 4096}}


def llama_fake(folder, slot_tokens: int = 0) -> FakeEngine:
    """The fake engine as llama-server: /props, /slots with what slot 0 holds, slot actions into `folder`."""
    return FakeEngine(folder=folder, props=dict(PROPS), slot_tokens=slot_tokens)


def listing_fake(kind: str, max_model_len: int) -> FakeEngine:
    """The fake engine as vLLM or SGLang list themselves in /v1/models."""
    return FakeEngine(models=[{"id": "zai-org/GLM-5", "object": "model", "owned_by": kind,
                               "max_model_len": max_model_len}])


def backend(url: str, **keys) -> BackendConfig:
    return BackendConfig(name="p", url=url, **keys)


# ---- llama-server ------------------------------------------------------------------------------

async def test_llama_server_reads_its_context_identity_and_slot_from_its_own_routes(serve_app, upstream, tmp_path):
    fake = llama_fake(tmp_path, slot_tokens=321)
    command = "llama-server -m m.gguf --rope-freq-base 20000 --port {port}"
    engine = LlamaServer(backend(await serve_app(fake.app()), command=command), upstream)
    assert await engine.health(timeout=1) == 200
    assert await engine.context_size(timeout=1) == 4096
    assert await engine.slot_tokens() == 321
    assert await engine.server_id() == ServerId("/models/m.gguf", 4096, "b1-abc", "", kv_args(command), "")
    fake.in_flight = 1
    assert await engine.processing() == 1
    fake.in_flight = 0
    assert await engine.processing() == 0
    assert (await engine.slots(timeout=1))[0]["n_prompt_tokens"] == 321


async def test_llama_server_saves_and_restores_slot_0_and_says_why_a_restore_failed(serve_app, upstream, tmp_path):
    fake = llama_fake(tmp_path)
    engine = LlamaServer(backend(await serve_app(fake.app()), kv_save_dir=str(tmp_path)), upstream)
    assert engine.saves_slots()
    assert (await engine.save_slot("k-1.bin", timeout=5))["n_saved"] == 123
    assert (await engine.restore_slot("k-1.bin", timeout=5))["n_restored"] == 123
    fake.restore_error = "invalid slot file"
    with pytest.raises(GatewayError, match="HTTP 400: 'invalid slot file'"):
        await engine.restore_slot("k-1.bin", timeout=5)
    assert fake.actions == [("save", "k-1.bin"), ("restore", "k-1.bin"), ("restore", "k-1.bin")]


async def test_llama_server_without_props_or_slots_knows_nothing_and_never_raises_for_tokens(serve_app, upstream):
    fake = FakeEngine(slots_endpoint=False)  # no /props, /slots answers 501 (--no-slots)
    engine = LlamaServer(backend(await serve_app(fake.app())), upstream)
    assert await engine.context_size(timeout=1) is None
    assert await engine.server_id() is None
    assert await engine.slot_tokens() == 0
    assert await engine.processing() is None
    dead = LlamaServer(backend("http://127.0.0.1:9"), upstream)
    assert await dead.slot_tokens() == 0 and await dead.server_id() is None
    with pytest.raises(UpstreamUnavailable):
        await dead.processing()


def test_which_llama_servers_save_their_slot():
    assert LlamaServer(backend("http://h", command="x"), UpstreamClient()).saves_slots()
    assert not LlamaServer(backend("http://h", command="x", kv_save=False), UpstreamClient()).saves_slots()
    assert not LlamaServer(backend("http://h", command="x", role="background"), UpstreamClient()).saves_slots()
    assert not LlamaServer(backend("http://h"), UpstreamClient()).saves_slots()  # run by hand, no folder named


# ---- vLLM and SGLang ---------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", [Vllm, SGLang])
async def test_vllm_and_sglang_give_their_context_from_v1_models_and_save_nothing(serve_app, upstream, adapter):
    fake = listing_fake(adapter.kind, 131072)
    engine = adapter(backend(await serve_app(fake.app()), kv_save_dir="/tmp/unused"), upstream)
    assert await engine.health(timeout=1) == 200
    assert await engine.context_size(timeout=1) == 131072
    assert not engine.saves_slots()
    with pytest.raises(GatewayError, match=f"{adapter.kind} does not save slots"):
        await engine.save_slot("k-1.bin", timeout=1)
    with pytest.raises(GatewayError, match="does not restore"):
        await engine.restore_slot("k-1.bin", timeout=1)
    assert await engine.slot_tokens() == 0 and await engine.server_id() is None
    assert await engine.slots(timeout=1) is None
    assert await engine.processing() is None  # let-go unknown: the slot is free once the connection closed


# ---- which engine a backend gets ---------------------------------------------------------------

def test_a_supervised_backend_or_one_with_a_save_folder_is_llama_server_any_other_is_found_out():
    u = UpstreamClient()
    assert type(engine_for(backend("http://h", command="x"), u)) is LlamaServer
    assert type(engine_for(backend("http://h", kv_save_dir="/s"), u)) is LlamaServer
    remote = engine_for(backend("http://h"), u)
    assert type(remote) is Unnamed and not remote.saves_slots()


@pytest.mark.parametrize("kind, found", [("vllm", Vllm), ("sglang", SGLang)])
async def test_a_server_not_named_is_found_out_from_v1_models(serve_app, upstream, kind, found):
    fake = listing_fake(kind, 32768)
    engine = engine_for(backend(await serve_app(fake.app())), upstream)
    assert await engine.context_size(timeout=1) == 32768
    assert type(engine.found) is found
    assert await engine.processing() is None


@pytest.mark.parametrize("config", [{"command": "vllm serve /models/m"}, {"kv_save_dir": "/s"}])
async def test_a_supervised_engine_whose_props_give_no_context_is_asked_v1_models(serve_app, upstream, config):
    """A `command` is free-form: a supervised vLLM is taken for llama-server, and its context (what
    `orchestrator claude` sets Claude Code's compaction window from) still comes from /v1/models."""
    fake = listing_fake("vllm", 32768)
    engine = engine_for(backend(await serve_app(fake.app()), **config), upstream)
    assert type(engine) is LlamaServer
    assert await engine.context_size(timeout=1) == 32768


async def test_a_llama_server_not_named_is_asked_as_llama_server(serve_app, upstream, tmp_path):
    fake = llama_fake(tmp_path, slot_tokens=7)
    engine = engine_for(backend(await serve_app(fake.app())), upstream)
    assert await engine.context_size(timeout=1) == PROPS["default_generation_settings"]["n_ctx"]
    assert type(engine.found) is LlamaServer
    assert await engine.slot_tokens() == 7 and (await engine.server_id()).n_ctx == 4096
    fake.in_flight = 1
    assert await engine.processing() == 1


async def test_a_server_with_neither_props_nor_models_is_asked_for_its_slots_as_before(serve_app, upstream):
    fake = FakeEngine(capacity=2)  # /slots like llama-server, no /props, no /v1/models
    engine = engine_for(backend(await serve_app(fake.app())), upstream)
    assert await engine.context_size(timeout=1) is None
    fake.in_flight = 2
    assert await engine.processing() == 2


# ---- the seam: an engine of the test's own -----------------------------------------------------

class InProcess(Engine):
    """An engine with no server: what each call answers is set by the test."""

    kind = "in-process"

    def __init__(self, backend: BackendConfig, upstream: UpstreamClient) -> None:
        super().__init__(backend, upstream)
        self.statuses = [200]
        self.counts: list[int | None | Exception] = []
        self.asked = 0

    async def health(self, timeout: float) -> int:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    async def context_size(self, timeout: float) -> int | None:
        return 8192

    def saves_slots(self) -> bool:
        return True

    async def processing(self) -> int | None:
        self.asked += 1
        answer = self.counts.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_a_gateway_built_with_an_engine_of_its_own_asks_only_it(tmp_path):
    config = config_from_dict({"backends": [{"name": "p", "url": "http://127.0.0.1:9", "kv_save_dir": str(tmp_path)}]})
    gw = build_gateway(config, CollectorRegistry(), engines=InProcess)
    b = gw.backends["p"]
    assert isinstance(b.engine, InProcess) and b.health.engine is b.engine and b.kv.engine is b.engine
    b.engine.statuses = [503, 200]
    assert await b.health.check(timeout=1) is State.LOADING
    assert await b.health.check(timeout=1) is State.READY and b.health.n_ctx == 8192
    assert gw.metrics.registry.get_sample_value("orchestrator_backend_up", {"backend": "p"}) == 1


async def test_an_abandoned_request_is_released_as_the_engine_says(tmp_path):
    engine = InProcess(backend("http://127.0.0.1:9"), UpstreamClient())

    async def released(*counts, answered=True) -> Released:
        engine.counts = list(counts)
        return await wait_released(engine, others=lambda: 0, answered=answered, late_after=60, on_late=print)

    assert await released(1, 1, 0) is Released.IDLE
    assert await released(GatewayError("slow"), 0) is Released.IDLE  # a look that failed: asked again
    assert await released(UpstreamUnavailable("refused")) is Released.GONE
    assert await released(None) is Released.UNKNOWN
    assert engine.counts == []


async def test_the_release_of_an_abandoned_request_asks_the_backends_engine():
    config = config_from_dict({"backends": [{"name": "p", "url": "http://127.0.0.1:9"}]})
    gw = build_gateway(config, CollectorRegistry(), engines=InProcess)
    b = gw.backends["p"]
    b.engine.counts = [1, 0]
    lease = await b.queue.acquire()
    with in_slot(gw, b, lease) as call:
        call.sent = call.answered = True  # the client left mid-answer: abandoned
    assert b.queue.busy == 1 and b.held
    await asyncio.gather(*b.held)
    assert b.queue.busy == 0 and b.engine.asked == 2
