"""Every request body the planner builds is valid under the official images schema."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cometbatch import CapabilityError, Job, ModelRegistry, load_manifest
from cometbatch.plan import plan_job

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "tests" / "spec" / "openai-images-v1.yaml"
DEMO = ROOT / "jobs" / "demo.jsonl"


@functools.cache
def validator() -> jsonschema.protocols.Validator:
    """A validator for CreateImageRequest, its references resolved within the spec."""
    spec = yaml.safe_load(SPEC.read_text())
    schema = {"$ref": "#/components/schemas/CreateImageRequest", **spec}
    cls = jsonschema.validators.validator_for(
        {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    )
    return cls(schema)


def invalid(payloads: list[dict[str, Any]]) -> list[str]:
    """Each body the schema refuses, with the first reason."""
    problems = []
    for payload in payloads:
        errors = sorted(validator().iter_errors(payload), key=lambda e: list(e.path))
        if errors:
            problems.append(f"{payload}: {errors[0].message}")
    return problems


def bodies(jobs: list[Job], registry: ModelRegistry) -> list[dict[str, Any]]:
    return [request.payload for job in jobs for request in plan_job(job, registry.get(job.model))]


# Every documented parameter, each value a model accepts (with its needs met).
VALUES: dict[str, list[Any]] = {
    "quality": ["standard", "hd", "low", "medium", "high", "auto"],
    "style": ["vivid", "natural"],
    "response_format": ["url", "b64_json"],
    "output_format": ["png", "jpeg", "webp"],
    "output_compression": [0, 55, 100],
    "background": ["transparent", "opaque", "auto"],
    "moderation": ["low", "auto"],
    "user": ["user-1234"],
}
SIZES = [
    "auto", "256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024",
    "1024x1792", "1536x864", "3840x2160", "1280x3840", "2048x2048",
]  # fmt: skip


def covering_jobs(registry: ModelRegistry) -> list[Job]:
    """For every model and a member of every family: each size of a spread it takes (the
    standard ones, free sizes at the limits), every value of every parameter it takes (each
    alone, with what it needs), and n from 1 to past its per-request limit."""
    jobs: list[Job] = []
    counter = itertools.count()

    def add(spec_name: str, **fields: Any) -> None:
        job = Job(id=f"c{next(counter)}", prompt="a lighthouse", model=spec_name, **fields)
        spec = registry.get(spec_name)
        try:
            spec.check(job.params(), job.prompt)
        except CapabilityError:
            return
        jobs.append(job)

    # Every listed model, and a member of each family (a name only its pattern knows).
    names = [spec.name for spec in registry if spec.known]
    names += [family.name.replace("*", "9.9-test") for family in registry.families]
    for name in names:
        spec = registry.get(name)
        for size in SIZES:
            add(spec.name, size=size)
        for name, values in VALUES.items():
            for value in values:
                needs: dict[str, Any] = {}
                if name == "output_compression" or (
                    name == "background" and value == "transparent"
                ):
                    needs["output_format"] = "webp"
                add(spec.name, **{name: value, **needs})
        for n in (1, 2, spec.max_n, spec.max_n + 3):
            add(spec.name, n=n)
    return jobs


def test_the_demo_manifest_builds_only_valid_requests() -> None:
    manifest = load_manifest(DEMO)
    payloads = bodies(list(manifest), manifest.registry)
    assert payloads and invalid(payloads) == []


def test_every_model_and_parameter_builds_valid_requests() -> None:
    """Every known model with every size and parameter value it accepts: 0 invalid bodies
    (and enough of them that each model and parameter is really covered)."""
    registry = ModelRegistry()
    jobs = covering_jobs(registry)
    payloads = bodies(jobs, registry)
    covered = {(p["model"], key) for p in payloads for key in p}
    for spec in registry:
        if spec.known:
            assert (spec.name, "prompt") in covered, spec.name
    for family in registry.families:
        assert (family.name.replace("*", "9.9-test"), "prompt") in covered, family.name
    assert {key for _, key in covered} >= {"size", "quality", "n", "user"}
    assert invalid(payloads) == []
    print(f"{len(payloads)} request bodies checked against CreateImageRequest")


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "n": 11},
        {"prompt": "x", "quality": "ultra"},
        {"prompt": "x", "size": 1024},
        {"prompt": 3},
    ],
)
def test_the_schema_check_refuses_what_the_api_refuses(body: dict[str, Any]) -> None:
    """The check can fail: bodies the official schema refuses are found."""
    assert invalid([body])
