"""Resume decisions as a table: recorded outcome and fingerprint in, verdict out."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import ledger_results, no_sleep, run_all, settings_for

from cometbatch import Engine, Job, SimConfig, Simulator
from cometbatch.engine import resume as resume_module
from cometbatch.engine.resume import Verdict, decide
from cometbatch.ledger.keystate import KeyState

FP, OTHER = "a" * 16, "b" * 16


def recorded(status: str, fingerprint: str | None = FP, retryable: bool | None = None) -> KeyState:
    return KeyState("job#0", status, fingerprint, retryable, "job", 1)


@pytest.mark.parametrize(
    ("state", "retry_failed", "verdict"),
    [
        (None, False, "send"),
        (recorded("ok"), False, "reuse"),
        (recorded("ok"), True, "reuse"),
        (recorded("ok", fingerprint=None), False, "reuse"),
        (recorded("ok", fingerprint=OTHER), False, "changed"),
        (recorded("failed", retryable=True), False, "send"),
        (recorded("failed", retryable=False), False, "keep"),
        (recorded("failed", retryable=False), True, "send"),
        (recorded("failed", fingerprint=OTHER, retryable=False), False, "send"),
        (recorded("failed", retryable=None), False, "send"),
        # Generated and paid for, not downloaded: fetch again, never generate again...
        (recorded("download_failed", retryable=True), False, "fetch"),
        (recorded("download_failed", retryable=True), True, "fetch"),
        (recorded("download_failed", retryable=None), False, "fetch"),
        # ...unless the link is gone for good: kept, or regenerated when the user asks.
        (recorded("download_failed", retryable=False), False, "keep"),
        (recorded("download_failed", retryable=False), True, "send"),
        (recorded("download_failed", fingerprint=OTHER, retryable=True), False, "changed"),
        # Some images came (paid for, kept): only the rest is sent, unless it failed for good.
        (recorded("partial"), False, "rest"),
        (recorded("partial", retryable=True), False, "rest"),
        (recorded("partial", retryable=False), False, "keep"),
        (recorded("partial", retryable=False), True, "rest"),
        (recorded("partial", fingerprint=OTHER), False, "changed"),
    ],
)
def test_decide(state: KeyState | None, retry_failed: bool, verdict: Verdict) -> None:
    """ok keys are reused unless changed; permanent failures are kept unless asked or edited;
    images generated but not downloaded are fetched again."""
    assert decide(FP, state, retry_failed=retry_failed) == verdict


@pytest.mark.parametrize(
    ("state", "missing", "withdrawn", "verdict"),
    [
        # An ok line whose files are still there is reused; one whose files are gone is
        # restored (generated again), unless the job changed anyway.
        (recorded("ok"), False, None, "reuse"),
        (recorded("ok"), True, None, "restore"),
        (recorded("ok", fingerprint=OTHER), True, None, "changed"),
        # A line that withdrew the key's images (set aside, or found missing or damaged): the
        # same request restores them (put back if whole, else generated again); another
        # request is a changed job, as it was before the images were withdrawn.
        (recorded("failed", retryable=True), False, FP, "restore"),
        (recorded("failed", fingerprint=OTHER, retryable=True), False, OTHER, "changed"),
        # A later request under the key failed, its line carrying the withdrawn images on: the
        # request they belong to restores them; that later request is its own failure.
        (recorded("failed", fingerprint=OTHER, retryable=False), False, FP, "restore"),
        (recorded("failed", fingerprint=OTHER, retryable=True), False, FP, "restore"),
        (recorded("failed", retryable=False), False, OTHER, "keep"),
        (recorded("failed", retryable=True), False, OTHER, "send"),
        # A plain retryable failure is sent as before.
        (recorded("failed", retryable=True), False, None, "send"),
    ],
)
def test_decide_restores_what_is_gone(
    state: KeyState, missing: bool, withdrawn: str | None, verdict: Verdict
) -> None:
    """Files gone from under an ok line, or withdrawn by an earlier line, are restored."""
    assert decide(FP, state, retry_failed=False, missing=missing, withdrawn=withdrawn) == verdict


async def test_each_request_of_a_resumed_run_is_decided_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun decides each request once, whatever it was (ok, kept, retried, partly answered,
    new): triage decides, and the request's life acts on that verdict without deciding again."""
    kept, retried = Job(id="b", prompt="kept"), Job(id="c", prompt="retried")
    partial = Job(id="d", prompt="partial", model="dall-e-2", n=4, response_format="b64_json")
    done, new = Job(id="a", prompt="done"), Job(id="e", prompt="new")
    async with Simulator(SimConfig(seed=5)) as sim:
        # One at a time, one attempt: b is refused (kept), c fails retryably, d's answer is
        # short and asking for the rest fails retryably, a is answered.
        sim.enqueue("400", "500", "short", "500")
        first = settings_for(sim, concurrency=1, max_attempts=1)
        async with Engine(first, out_dir=tmp_path, sleep=no_sleep) as engine:
            await run_all(engine, [kept, retried, partial, done])
        statuses = {line["key"]: line["status"] for line in ledger_results(tmp_path)}
        assert statuses == {"b#0": "failed", "c#0": "failed", "d#0": "partial", "a#0": "ok"}
        decided: Counter[str] = Counter()

        def counting(fingerprint: str, *args: Any, **kwargs: Any) -> Verdict:
            decided[fingerprint] += 1
            return real(fingerprint, *args, **kwargs)

        # Wherever the package holds decide, so a second caller anywhere is counted too.
        real = resume_module.decide
        for name, module in list(sys.modules.items()):
            if name.startswith("cometbatch") and getattr(module, "decide", None) is real:
                monkeypatch.setattr(module, "decide", counting)
        async with Engine(settings_for(sim), out_dir=tmp_path, sleep=no_sleep) as engine:
            got = await run_all(engine, [kept, retried, partial, done, new])
    assert sorted(r.key for r in got if r.ok) == ["c#0", "d#0", "e#0"]
    assert engine.summary.kept_failures == 1 and engine.summary.skipped_requests == 1
    assert len(decided) == 5 and set(decided.values()) == {1}
