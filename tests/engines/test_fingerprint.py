"""A server run by hand is known by its answer to the probe (engines/fingerprint.py): figures as
measured on the real SmolLM2 server (issue 28), each the same server or not."""

from orchestrator.engines import fingerprint
from orchestrator.engines.base import ServerId
from orchestrator.kv.parking import Parking, SlotFound

DEFAULT = "198:-0.806,33:-2.192,34:-2.773,378:-2.802,35:-3.390"       # 2 threads, and 1: the same
ROPE_5000 = "198:-0.691,33:-2.560,378:-2.747,34:-3.488,669:-3.964"
ROPE_90000 = "198:-0.727,33:-2.244,378:-2.846,34:-2.881,35:-3.481"   # instead of the model's 100000
CACHE_Q8 = "198:-0.779,33:-2.194,34:-2.777,378:-2.799,35:-3.462"


def test_only_figures_within_the_tolerance_are_the_same_server():
    assert fingerprint.same(DEFAULT, DEFAULT)
    assert fingerprint.same("198:-0.806,33:-2.192,34:-2.773,378:-2.802,35:-3.380", DEFAULT)
    for other in (ROPE_5000, ROPE_90000, CACHE_Q8, "", None, "junk", DEFAULT.rsplit(",", 1)[0]):
        assert not fingerprint.same(other, DEFAULT), other


def test_an_unknown_identity_is_equal_to_itself_alone():
    a, b = fingerprint.unknown(), fingerprint.unknown()
    assert fingerprint.same(a, a) and not fingerprint.same(a, b) and not fingerprint.same(a, DEFAULT)


def test_the_figures_are_read_from_llama_servers_answer():
    top = [{"id": 198, "token": "\n", "logprob": -0.8061}, {"id": 33, "logprob": -2.192},
           {"id": 34, "logprob": -2.773}, {"id": 378, "logprob": -2.8024}, {"id": 35, "logprob": -3.39}]
    assert fingerprint.of_answer({"completion_probabilities": [{"top_logprobs": top}]}) == DEFAULT
    assert fingerprint.of_answer({"completion_probabilities": [{"top_logprobs": top[:2]}]}) is None
    assert fingerprint.of_answer({"content": "x"}) is None


def test_a_save_is_refused_by_a_server_that_answers_otherwise():
    ids = ("m.gguf", 4096, "b1", "10:2", "")
    saved = ServerId(*ids, probe=DEFAULT).fields()
    assert ServerId(*ids, probe=DEFAULT).mismatch(saved) == ""
    assert ServerId(*ids, probe="198:-0.806,33:-2.192,34:-2.773,378:-2.802,35:-3.385").mismatch(saved) == ""
    assert "probe" in ServerId(*ids, probe=ROPE_5000).mismatch(saved)
    # A supervised server is known by its command: no probe on either side.
    assert ServerId(*ids).mismatch(ServerId(*ids).fields()) == ""


def test_after_a_restart_without_a_restore_the_slot_holds_nothing_to_park():
    """A park after such a restart saved the probe's 31 tokens as the last conversation, over its save."""
    p = Parking()
    p.given("a")
    p.ended_whole("a")
    p.restarted(None)
    assert p.found("b") is SlotFound.EMPTY and not p.holder_whole
