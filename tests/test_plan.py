"""Planning: fan-out by the model's max n, stable keys and fingerprints, only accepted params."""

from __future__ import annotations

import pytest

from cometbatch import Job, ModelRegistry
from cometbatch.plan import Request, chunk_sizes, fingerprint, plan_job

REGISTRY = ModelRegistry()


def plan(**fields: object) -> list[Request]:
    job = Job.model_validate({"prompt": "p", **fields})
    return list(plan_job(job, REGISTRY.get(job.model)))


@pytest.mark.parametrize(
    ("n", "max_n", "sizes"),
    [(1, 1, [1]), (3, 1, [1, 1, 1]), (10, 10, [10]), (14, 10, [10, 4]), (25, 10, [10, 10, 5])],
)
def test_chunk_sizes(n: int, max_n: int, sizes: list[int]) -> None:
    """n images split into ceil(n / max_n) requests of at most max_n."""
    assert chunk_sizes(n, max_n) == sizes


def test_dall_e_3_never_gets_n_above_one() -> None:
    """dall-e-3 with n=3 becomes three requests that do not send n > 1."""
    requests = plan(model="dall-e-3", n=3, id="j")
    assert [r.key for r in requests] == ["j#0", "j#1", "j#2"]
    assert all(r.payload.get("n", 1) == 1 for r in requests)
    assert [list(r.indexes) for r in requests] == [[0], [1], [2]]


def test_qwen_image_never_gets_n_above_one() -> None:
    """qwen-image with n=2 becomes two single-image requests."""
    requests = plan(model="qwen-image", n=2)
    assert len(requests) == 2
    assert all(r.payload.get("n", 1) == 1 for r in requests)


def test_gpt_image_fans_out_by_ten_and_never_sends_response_format() -> None:
    """gpt-image-1 with n=14 sends 10 then 4, and never response_format even if the job has it."""
    requests = plan(model="gpt-image-1", n=14, response_format="b64_json", quality="low")
    assert [r.payload["n"] for r in requests] == [10, 4]
    assert [r.first_index for r in requests] == [0, 10]
    assert all("response_format" not in r.payload for r in requests)
    assert requests[0].payload["quality"] == "low"


def test_extra_is_passed_through_and_metadata_is_never_sent() -> None:
    """Provider fields in extra are sent as-is; metadata stays local."""
    (request,) = plan(model="qwen-image", extra={"seed": 3}, metadata={"secret": "x"})
    assert request.payload == {"model": "qwen-image", "prompt": "p", "seed": 3}


def test_fingerprint_is_stable_and_tracks_what_is_sent() -> None:
    """The fingerprint ignores key order and changes when a sent field changes."""
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    (a,) = plan(model="dall-e-3", size="1024x1024", id="x")
    (b,) = plan(model="dall-e-3", size="1792x1024", id="x")
    (c,) = plan(model="dall-e-3", size="1024x1024", id="x", metadata={"m": 1})
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == c.fingerprint
