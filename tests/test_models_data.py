"""Model capabilities as data: the built-in file, gpt-image-2's rules, families, users' files."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cometbatch import CapabilityError, ConfigError, Job, ModelRegistry, ModelSpec
from cometbatch.errors import ModelsError
from cometbatch.models.data import builtin_catalog, load_catalog
from cometbatch.models.registry import BUILTIN_MODELS, load_registry, recorded_registry
from cometbatch.models.sizes import SizeRule, parse_size
from cometbatch.models.spec import Requirement
from cometbatch.plan import plan_job

REGISTRY = ModelRegistry()
GPT_IMAGE_2 = ("gpt-image-2", "gpt-image-2-2026-04-21", "gpt-image-2.6-flare")

# The six models' rules exactly as they were written in Python before they became data.
_DALLE_URL = ("url", "b64_json")
_GPT_IMAGE: dict[str, Any] = {
    "max_n": 10,
    "sizes": ("1024x1024", "1536x1024", "1024x1536", "auto"),
    "response_formats": ("b64_json",),
    "send_response_format": False,
    "max_prompt_chars": 32000,
    "params": {
        "quality": ("low", "medium", "high", "auto"),
        "output_format": ("png", "jpeg", "webp"),
        "background": ("transparent", "opaque", "auto"),
        "moderation": ("low", "auto"),
        "user": None,
    },
    "int_ranges": {"output_compression": (0, 100)},
    "requirements": (
        Requirement(
            param="background",
            values=("transparent",),
            needs="output_format",
            allowed=("png", "webp"),
            default="png",
        ),
        Requirement(
            param="output_compression",
            needs="output_format",
            allowed=("jpeg", "webp"),
            default="png",
        ),
    ),
}
# quality "auto" for dall-e-2 and dall-e-3 is the one deliberate change (the official schema).
SIX = (
    ModelSpec(
        name="dall-e-2",
        max_n=10,
        sizes=("256x256", "512x512", "1024x1024"),
        response_formats=_DALLE_URL,
        max_prompt_chars=1000,
        params={"quality": ("standard", "auto"), "user": None},
    ),
    ModelSpec(
        name="dall-e-3",
        max_n=1,
        sizes=("1024x1024", "1792x1024", "1024x1792"),
        response_formats=_DALLE_URL,
        max_prompt_chars=4000,
        params={"quality": ("standard", "hd", "auto"), "style": ("vivid", "natural"), "user": None},
        returns_revised_prompt=True,
    ),
    *(
        ModelSpec.model_validate({"name": name, **_GPT_IMAGE})
        for name in ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
    ),
    ModelSpec(name="qwen-image", max_n=1, sizes=None, response_formats=_DALLE_URL, params={}),
)
_PROVENANCE = {"source", "as_of"}


@pytest.mark.parametrize("expected", SIX, ids=lambda spec: spec.name)
def test_the_six_models_keep_their_rules(expected: ModelSpec) -> None:
    """Read from the data file, each of the six models has exactly its former rules."""
    got = REGISTRY.get(expected.name)
    assert got.model_dump(exclude=_PROVENANCE) == expected.model_dump(exclude=_PROVENANCE)


def test_every_entry_says_where_its_rules_come_from_and_when() -> None:
    """Each built-in model and family has a source and an ISO as_of date."""
    catalog = builtin_catalog()
    entries = [*catalog.models.values(), *catalog.families.values()]
    assert {spec.name for spec in entries} >= {
        "gpt-image-2",
        "gpt-image-2-2026-04-21",
        "gpt-image-*",
    }
    for spec in entries:
        assert spec.source, spec.name
        assert spec.as_of and re.fullmatch(r"\d{4}-\d{2}-\d{2}", spec.as_of), spec.name
    assert [spec.name for spec in BUILTIN_MODELS] == list(catalog.models)


def test_importing_cometbatch_reads_no_model_data() -> None:
    """The data file is read on first use, not when the package is imported."""
    code = (
        "import cometbatch, cometbatch.cli.main, cometbatch.models.registry\n"
        "import cometbatch.models.data as d\n"
        "print(d.builtin_catalog.cache_info().currsize, d._builtin_raw.cache_info().currsize)\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert shown.stdout.split() == ["0", "0"]


def test_the_data_is_read_once() -> None:
    """Every registry built from the built-in data shares one reading of the file."""
    assert builtin_catalog() is builtin_catalog()
    assert load_catalog() is builtin_catalog()


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("1536x864", (1536, 864)),
        ("16x16", (16, 16)),
        ("auto", None),
        ("1024X1024", None),
        ("01024x1024", None),
        ("0x1024", None),
        ("1024x", None),
        (" 1024x1024", None),
        (1024, None),
        (None, None),
    ],
)
def test_parse_size(value: Any, parsed: tuple[int, int] | None) -> None:
    """Only WIDTHxHEIGHT with positive whole numbers (no leading zeros) is a size."""
    assert parse_size(value) == parsed


ACCEPTED_SIZES = [
    "auto", "1024x1024", "1536x1024", "1024x1536", "1536x864", "864x1536", "16x16",
    "3840x2160", "2160x3840", "3840x1280", "1280x3840", "2880x2880", "2560x1440",
]  # fmt: skip
REFUSED_SIZES = [
    ("1000x1000", "both sides must be divisible by 16"),
    ("4000x1000", "both sides must be divisible by 16"),
    ("1536x860", "both sides must be divisible by 16"),
    ("4096x2304", "the longer side must be at most 3840"),
    ("3856x1296", "the longer side must be at most 3840"),
    ("3840x1264", "the aspect ratio must be within 1:3 and 3:1"),
    ("1264x3840", "the aspect ratio must be within 1:3 and 3:1"),
    ("3840x2176", "at most 8,294,400 pixels"),
    ("2896x2896", "at most 8,294,400 pixels"),
    ("1024X1024", "not a size of the form WIDTHxHEIGHT"),
    ("big", "not a size of the form WIDTHxHEIGHT"),
]


@pytest.mark.parametrize("model", GPT_IMAGE_2)
@pytest.mark.parametrize("size", ACCEPTED_SIZES)
def test_gpt_image_2_takes_free_sizes_within_the_rule(model: str, size: str) -> None:
    """auto, the standard sizes and any WxH within the rule are accepted."""
    REGISTRY.get(model).check({"size": size}, "p")


@pytest.mark.parametrize("model", GPT_IMAGE_2)
@pytest.mark.parametrize(("size", "why"), REFUSED_SIZES)
def test_gpt_image_2_refuses_sizes_naming_the_rule(model: str, size: str, why: str) -> None:
    """A size outside the rule is a CapabilityError on 'size' that says why and what is allowed."""
    with pytest.raises(CapabilityError) as caught:
        REGISTRY.get(model).check({"size": size}, "p")
    assert caught.value.field == "size"
    message = str(caught.value)
    assert f"size {size!r}: {why}" in message
    assert "sides divisible by 16, ratio 1:3 to 3:1, longer side at most 3840" in message


def test_the_six_keep_their_fixed_sizes() -> None:
    """A free size that gpt-image-2 takes is still refused by gpt-image-1 and dall-e-3."""
    for model in ("gpt-image-1", "dall-e-3"):
        with pytest.raises(CapabilityError, match="does not take size '1536x864'; sizes: "):
            REGISTRY.get(model).check({"size": "1536x864"}, "p")


GOOD_PARAMS: list[dict[str, Any]] = [
    {"quality": "low"}, {"quality": "medium"}, {"quality": "high"}, {"quality": "auto"},
    {"output_format": "png"}, {"output_format": "jpeg"}, {"output_format": "webp"},
    {"output_format": "jpeg", "output_compression": 0},
    {"output_format": "webp", "output_compression": 100},
    {"background": "transparent"}, {"background": "transparent", "output_format": "webp"},
    {"background": "opaque", "output_format": "jpeg"}, {"background": "auto"},
    {"moderation": "low"}, {"moderation": "auto"}, {"user": "user-1234"},
]  # fmt: skip
BAD_PARAMS: list[tuple[dict[str, Any], str]] = [
    ({"quality": "hd"}, "quality"),
    ({"quality": "standard"}, "quality"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
    ({"output_format": "jpeg", "output_compression": -1}, "output_compression"),
    ({"output_format": "jpeg", "output_compression": 50.5}, "output_compression"),
    ({"output_compression": 80}, "output_compression"),
    ({"output_format": "png", "output_compression": 80}, "output_format"),
    ({"background": "transparent", "output_format": "jpeg"}, "output_format"),
    ({"background": "none"}, "background"),
    ({"moderation": "high"}, "moderation"),
    ({"style": "vivid"}, "style"),
    ({"response_format": "b64_json"}, "response_format"),
    ({"response_format": "url"}, "response_format"),
]


@pytest.mark.parametrize("model", GPT_IMAGE_2)
@pytest.mark.parametrize("params", GOOD_PARAMS)
def test_gpt_image_2_takes_the_documented_values(model: str, params: dict[str, Any]) -> None:
    """quality, output_format, output_compression, background, moderation and user as documented."""
    REGISTRY.get(model).check(params, "p")


@pytest.mark.parametrize("model", GPT_IMAGE_2)
@pytest.mark.parametrize(("params", "field"), BAD_PARAMS)
def test_gpt_image_2_refuses_other_values(model: str, params: dict[str, Any], field: str) -> None:
    """Any other value, and response_format at all, is refused naming the field."""
    with pytest.raises(CapabilityError) as caught:
        REGISTRY.get(model).check(params, "p")
    assert caught.value.field == field


def test_response_format_b64_json_stays_accepted_for_gpt_image_1() -> None:
    """gpt-image-1 keeps taking the b64_json it answers anyway (and leaves it out)."""
    spec = REGISTRY.get("gpt-image-1")
    spec.check({"response_format": "b64_json"}, "p")
    (request,) = plan_job(Job(prompt="p", model="gpt-image-1", response_format="b64_json"), spec)
    assert "response_format" not in request.payload
    with pytest.raises(CapabilityError, match="does not take response_format"):
        REGISTRY.get("gpt-image-2").check({"response_format": "b64_json"}, "p")


def test_gpt_image_2_prompt_length_and_n() -> None:
    """Prompts up to 32000 characters; up to 10 images per request."""
    spec = REGISTRY.get("gpt-image-2")
    spec.check({}, "x" * 32000)
    with pytest.raises(CapabilityError, match="at most 32000"):
        spec.check({}, "x" * 32001)
    assert spec.max_n == 10


@pytest.mark.parametrize(("n", "chunks"), [(14, [10, 4]), (12, [10, 2]), (10, [10]), (3, [3])])
def test_gpt_image_2_fans_out_by_ten(n: int, chunks: list[int]) -> None:
    """A job of n images at a free size becomes requests of at most 10, size sent as given."""
    job = Job(prompt="p", model="gpt-image-2", n=n, size="1536x864")
    requests = list(plan_job(job, REGISTRY.get("gpt-image-2")))
    assert [r.n for r in requests] == chunks
    assert all(r.payload["size"] == "1536x864" for r in requests)


@pytest.mark.parametrize("model", ["dall-e-2", "dall-e-3"])
def test_dall_e_takes_quality_auto(model: str) -> None:
    """quality "auto" is accepted (and sent) for dall-e-2 and dall-e-3; other values are not."""
    spec = REGISTRY.get(model)
    spec.check({"quality": "auto"}, "p")
    (request, *_) = plan_job(Job(prompt="p", model=model, quality="auto"), spec)
    assert request.payload["quality"] == "auto"
    with pytest.raises(CapabilityError):
        spec.check({"quality": "low"}, "p")
    with pytest.raises(CapabilityError):
        REGISTRY.get("dall-e-2").check({"quality": "hd"}, "p")


def test_a_family_member_gets_the_family_rules_with_one_notice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gpt-image-2.6-flare takes gpt-image-*'s rules, with one notice (shown by default) and
    not the unknown-model warning."""
    registry = ModelRegistry()
    caplog.set_level(logging.INFO, logger="cometbatch")
    assert "gpt-image-2.6-flare" in registry
    spec = registry.get("gpt-image-2.6-flare")
    again = registry.get("gpt-image-2.6-flare")
    assert spec is again and spec.max_n == 10 and spec.known and spec.family == "gpt-image-*"
    assert spec.size_rule == registry.get("gpt-image-2").size_rule
    requests = list(plan_job(Job(prompt="p", model="gpt-image-2.6-flare", n=3), spec))
    assert [r.n for r in requests] == [3]
    notices = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(notices) == 1
    assert notices[0][0] == logging.WARNING and "family 'gpt-image-*'" in notices[0][1]
    assert "not in cometbatch's registry" not in notices[0][1]


def test_an_unknown_model_keeps_the_fallback_and_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A name no pattern matches: 1 image per request, parameters unchecked, one warning."""
    registry = ModelRegistry()
    assert "flux-pro" not in registry
    spec = registry.get("flux-pro")
    registry.get("flux-pro")
    assert (spec.max_n, spec.known, spec.family) == (1, False, None)
    spec.check({"size": "640x480", "quality": "anything"}, "p")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not in cometbatch's registry" in warnings[0].getMessage()


def test_listed_models_say_nothing_and_a_quiet_registry_says_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Listed models never log; a quiet registry resolves families and unknowns silently."""
    caplog.set_level(logging.DEBUG, logger="cometbatch")
    ModelRegistry().get("gpt-image-2")
    quiet = ModelRegistry().quiet()
    assert quiet.get("gpt-image-2.6-flare").max_n == 10
    assert quiet.get("flux-pro").max_n == 1
    assert caplog.records == []


def test_an_exact_entry_beats_a_pattern_and_the_longest_pattern_wins(tmp_path: Path) -> None:
    """gpt-image-1 matches gpt-image-* but keeps its own rules; a longer pattern is preferred."""
    assert REGISTRY.get("gpt-image-1").size_rule is None
    path = tmp_path / "models.toml"
    path.write_text('[families."gpt-image-3*"]\nlike = "gpt-image-*"\nmax_n = 4\n')
    registry = ModelRegistry.from_file(path)
    assert registry.get("gpt-image-3-pro").max_n == 4
    assert registry.get("gpt-image-3-pro").family == "gpt-image-3*"
    assert registry.get("gpt-image-2.5-x").max_n == 10
    assert registry.get("gpt-image-2").family is None


def test_a_users_file_changes_and_adds_models_and_names_itself(tmp_path: Path) -> None:
    """Fields given replace the built-in ones; new models and families are added; the file is
    their source unless it names one."""
    path = tmp_path / "ours.toml"
    path.write_text(
        "[models.dall-e-2]\nmax_n = 4\n"
        '[models.flux-pro]\nmax_n = 2\nsizes = ["640x480"]\nparams = { seed = "*" }\n'
        'source = "https://example.com/flux"\nas_of = 2026-10-01\n'
        "[models.passthrough]\nmax_n = 3\n"
        '[models.gpt-image-2-fast]\nlike = "gpt-image-2"\nmax_n = 2\n'
    )
    registry = ModelRegistry.from_file(path)
    dalle = registry.get("dall-e-2")
    assert dalle.max_n == 4 and dalle.sizes == SIX[0].sizes
    assert (dalle.source, dalle.as_of) == (str(path), None)
    flux = registry.get("flux-pro")
    assert (flux.max_n, flux.sizes, flux.known, flux.params) == (
        2,
        ("640x480",),
        True,
        {"seed": None},
    )
    assert (flux.source, flux.as_of) == ("https://example.com/flux", "2026-10-01")
    with pytest.raises(CapabilityError):
        flux.check({"size": "1024x1024"}, "p")
    assert not registry.get("passthrough").known
    fast = registry.get("gpt-image-2-fast")
    assert fast.max_n == 2 and fast.size_rule == REGISTRY.get("gpt-image-2").size_rule
    # The built-in registry is untouched.
    assert ModelRegistry().get("dall-e-2").max_n == 10
    assert load_catalog(path).sources == (str(path),)


def test_a_like_follows_the_changed_entry(tmp_path: Path) -> None:
    """A change to gpt-image-2 in a user's file reaches the entries that are like it."""
    path = tmp_path / "ours.toml"
    path.write_text("[models.gpt-image-2]\nmax_n = 8\n")
    registry = ModelRegistry.from_file(path)
    assert registry.get("gpt-image-2-2026-04-21").max_n == 8
    assert registry.get("gpt-image-2.6-flare").max_n == 8
    assert (
        registry.get("gpt-image-2-2026-04-21").source
        == builtin_catalog().models["gpt-image-2-2026-04-21"].source
    )


@pytest.mark.parametrize(
    ("text", "entry", "words"),
    [
        ("[models.dall-e-2]\nmax_nn = 4\n", "models.dall-e-2.max_nn", "did you mean 'max_n'"),
        ("[models.dall-e-2]\nmax_n = 0\n", "models.dall-e-2.max_n", "greater than or equal to 1"),
        ('[models.dall-e-2]\nsizes = "big"\n', "models.dall-e-2.sizes", "tuple"),
        ("[models.m]\nname = 'x'\n", "models.m.name", "unknown field"),
        ('[models.m]\nas_of = "soon"\n', "models.m.as_of", "YYYY-MM-DD"),
        (
            "[models.m]\nsize_rule = { multiple_of = 0 }\n",
            "models.m.size_rule.multiple_of",
            "greater than or equal to 1",
        ),
        ("[models.m]\nsize_rule = { max_side = 9 }\n", "models.m.size_rule.max_side", "Extra"),
        ('[models.m]\nlike = "nothing"\n', "models.m.like", "no entry named 'nothing'"),
        (
            '[models.a]\nlike = "b"\n[models.b]\nlike = "a"\n',
            "models.b.like",
            "a loop: models.a -> models.b -> models.a",
        ),
        ('[families.gpt-image-9]\nlike = "gpt-image-2"\n', "families.gpt-image-9", "pattern"),
        ('[models."gpt-*"]\nmax_n = 2\n', "models.gpt-*", "families"),
        ("[models]\ndall-e-2 = 4\n", "models.dall-e-2", "table of fields"),
        ("models = 4\n", "models", "table of entries"),
        ('as_of = "2026-01-01"\n', "as_of", "expected models or families"),
    ],
)
def test_a_bad_file_is_a_config_error_naming_file_and_entry(
    tmp_path: Path, text: str, entry: str, words: str
) -> None:
    """Each bad entry or field is a ModelsError (a ConfigError) naming the file and where."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ModelsError) as caught:
        ModelRegistry.from_file(path)
    assert isinstance(caught.value, ConfigError)
    message = str(caught.value)
    assert message.startswith(f"models file {path}: {entry}: "), message
    assert words in message


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"[models\n", "not valid TOML"), (b"\xff\xfe[", "not UTF-8"), (None, "cannot read")],
)
def test_an_unreadable_file_is_a_config_error(
    tmp_path: Path, content: bytes | None, words: str
) -> None:
    """Broken TOML, non-UTF-8 bytes and a missing file each name the file."""
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelsError, match=f"^models file {re.escape(str(path))}: {words}"):
        load_registry(path)


def test_overrides_reach_families_and_family_members() -> None:
    """An override of a pattern changes the family; of a member, starts from the family."""
    registry = ModelRegistry().with_overrides(
        {"gpt-image-*": {"max_n": 5}, "gpt-image-2.7": {"max_n": 2}}
    )
    assert registry.get("gpt-image-2.6-flare").max_n == 5
    member = registry.get("gpt-image-2.7")
    assert member.max_n == 2 and member.size_rule is not None and member.known
    assert member.source == "model override"
    assert registry.get("gpt-image-2").max_n == 10


def test_load_registry_puts_overrides_over_the_file(tmp_path: Path) -> None:
    """The file is merged first, then the per-model overrides."""
    path = tmp_path / "ours.toml"
    path.write_text("[models.dall-e-2]\nmax_n = 4\nmax_prompt_chars = 50\n")
    registry = load_registry(path, {"dall-e-2": {"max_n": 2}})
    assert (registry.get("dall-e-2").max_n, registry.get("dall-e-2").max_prompt_chars) == (2, 50)


def test_a_recorded_registry_survives_a_lost_models_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A report rebuilds the run's registry; a file that is gone warns and uses the built-ins."""
    path = tmp_path / "ours.toml"
    path.write_text("[models.dall-e-2]\nmax_n = 4\n")
    settings = {"models_file": str(path), "model_overrides": {"qwen-image": {"max_n": 2}}}
    registry = recorded_registry(settings)
    assert (registry.get("dall-e-2").max_n, registry.get("qwen-image").max_n) == (4, 2)
    path.unlink()
    registry = recorded_registry(settings)
    assert (registry.get("dall-e-2").max_n, registry.get("qwen-image").max_n) == (10, 2)
    assert "cannot read the file" in caplog.text
    assert recorded_registry(None).get("dall-e-2").max_n == 10


def test_size_rule_describes_itself() -> None:
    """The rule in words lists each limit it sets, and nothing it does not."""
    assert SizeRule().describe() == "WIDTHxHEIGHT"
    rule = SizeRule(multiple_of=16, max_edge=3840, max_pixels=8294400, max_ratio=3)
    assert rule.describe() == (
        "WIDTHxHEIGHT with sides divisible by 16, ratio 1:3 to 3:1, longer side at most 3840, "
        "at most 8,294,400 pixels"
    )


@pytest.mark.parametrize("name", ["gpt-image-1-all", "gpt-image-1.5-2025-12-16"])
def test_first_generation_names_keep_the_first_generation_rules(name: str) -> None:
    """A gpt-image-1 name without an entry takes gpt-image-1's fixed sizes, not the free sizes
    of gpt-image-2's family: 1536x864 is refused, 1536x1024 taken."""
    spec = ModelRegistry().quiet().get(name)
    assert spec.family == "gpt-image-1*" and spec.max_n == 10
    spec.check({"size": "1536x1024"}, "p")
    with pytest.raises(CapabilityError):
        spec.check({"size": "1536x864"}, "p")
    assert ModelRegistry().quiet().get("gpt-image-2.5-sunburst").family == "gpt-image-*"
