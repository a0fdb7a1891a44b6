"""Short answers: a 420-image run where 30 % of the requests for several images are answered
with half of them. Counts the images the simulated API generated (what it would bill) against
the images planned: each short answer's images are kept and only the missing ones are asked
for again, so the target is no extra image at all, and no retry counted as possibly billed.
"""

from __future__ import annotations

import asyncio
import tempfile

from _common import finish, options, verdict

from cometbatch import Engine, Job, Settings, SimConfig, Simulator

# 420 images in requests of 2 to 10 (dall-e-2 takes up to 10 per request).
SIZES = [2, 3, 4, 5, 6, 7, 8, 9, 10] * 7 + [10, 10, 10, 10, 2]
SMOKE_SIZES = [2, 5, 10]
SHORT_RATE = 0.3
SEEDS = (1, 2, 3)


async def one_run(sizes: list[int], seed: int) -> tuple[int, int, int, int]:
    """(planned, billed, short answers, possibly billed retries) of one run."""
    jobs = [
        Job(id=f"j{i}", prompt=f"a lighthouse, study {i}", model="dall-e-2", n=n,
            response_format="b64_json")
        for i, n in enumerate(sizes)
    ]  # fmt: skip
    async with Simulator(SimConfig(seed=seed, rate_short=SHORT_RATE)) as sim:
        settings = Settings(base_url=sim.base_url, api_key="sk-bench", concurrency=16)
        with tempfile.TemporaryDirectory() as out:
            async with Engine(settings, out_dir=out) as engine:
                async for _ in engine.run(jobs):
                    pass
        summary = engine.summary
        assert summary.complete, summary.to_dict()
        stats = sim.stats
        return sum(sizes), stats.billed_images, stats.faults["short"], summary.ambiguous_retries


def main() -> None:
    opts = options(__doc__ or "", runs=len(SEEDS))
    sizes = SMOKE_SIZES if opts.smoke else SIZES
    worst = 0
    for seed in SEEDS[: opts.runs]:
        planned, billed, shorts, ambiguous = asyncio.run(one_run(sizes, seed))
        worst = max(worst, billed - planned)
        print(
            f"seed {seed}: {planned} images planned, {billed} generated (billed), "
            f"{shorts} short answers, {ambiguous} retries counted as possibly billed"
        )
    met = verdict("extra billed images", worst, 0, higher_is_better=False, unit=" images")
    finish(met, smoke=opts.smoke)


if __name__ == "__main__":
    main()
