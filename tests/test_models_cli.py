"""gpt-image-2, families and models files through the command line, the engine and the simulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cometbatch import Engine, ModelRegistry, Settings
from cometbatch.cli.main import main
from cometbatch.simulator.faults import ApiFailure
from cometbatch.simulator.rules import ImageRequest, parse_request

UNKNOWN_WARNING = "not in cometbatch's registry"


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result


def write(path: Path, *lines: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def dry_run(manifest: Path, *args: str) -> Result:
    return invoke(
        "run", str(manifest), "--dry-run", "--json", "--out", str(manifest.parent / "o"), *args
    )


def test_gpt_image_2_sizes_and_response_format_fail_the_dry_run_by_line(tmp_path: Path) -> None:
    """Sizes 1000x1000, 4000x1000, 4096x2304 and response_format on gpt-image-2: exit 2, each
    line named."""
    manifest = write(
        tmp_path / "m.jsonl",
        {"prompt": "ok", "model": "gpt-image-2", "size": "1536x864"},
        {"prompt": "a", "model": "gpt-image-2", "size": "1000x1000"},
        {"prompt": "b", "model": "gpt-image-2", "size": "4000x1000"},
        {"prompt": "c", "model": "gpt-image-2", "size": "4096x2304"},
        {"prompt": "d", "model": "gpt-image-2", "response_format": "b64_json"},
    )
    result = dry_run(manifest)
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert "4 invalid manifest line(s)" in error
    assert "line 2, field 'size': size '1000x1000': both sides must be divisible by 16" in error
    assert "line 3, field 'size': size '4000x1000': " in error
    assert "line 4, field 'size': size '4096x2304': the longer side must be at most 3840" in error
    assert "line 5, field 'response_format': gpt-image-2 does not take response_format" in error
    assert "line 1" not in error


def test_gpt_image_2_job_of_14_plans_two_requests(tmp_path: Path) -> None:
    """A gpt-image-2 job of n=14 at 1536x864 plans 2 requests (10 + 4), 14 images."""
    manifest = write(
        tmp_path / "m.jsonl", {"prompt": "p", "model": "gpt-image-2", "n": 14, "size": "1536x864"}
    )
    result = dry_run(manifest)
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)["models"]["gpt-image-2"]
    assert (planned["jobs"], planned["requests"], planned["images"]) == (1, 2, 14)
    assert UNKNOWN_WARNING not in result.stderr


def test_a_family_name_plans_one_request_without_the_unknown_warning(tmp_path: Path) -> None:
    """gpt-image-2.6-flare with n=3 is one request, with one family notice (shown without -v)
    and never the unknown-model warning."""
    manifest = write(tmp_path / "m.jsonl", {"prompt": "p", "model": "gpt-image-2.6-flare", "n": 3})
    result = dry_run(manifest)
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)["models"]["gpt-image-2.6-flare"]
    assert (planned["requests"], planned["images"]) == (1, 3)
    assert result.stderr.count("using the rules of its family 'gpt-image-*'") == 1
    assert UNKNOWN_WARNING not in result.stderr


def test_a_truly_unknown_model_still_warns_and_sends_one_per_request(tmp_path: Path) -> None:
    """A name no family matches keeps the fallback: n=3 is three requests and one warning."""
    manifest = write(tmp_path / "m.jsonl", {"prompt": "p", "model": "flux-pro", "n": 3})
    result = dry_run(manifest)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["models"]["flux-pro"]["requests"] == 3
    assert result.stderr.count(UNKNOWN_WARNING) == 1


def test_a_simulated_run_of_gpt_image_2_lands_every_image(tmp_path: Path) -> None:
    """The simulator takes gpt-image-2 at a free size and a family name: 14 + 3 images land."""
    manifest = write(
        tmp_path / "m.jsonl",
        {"id": "a", "prompt": "p", "model": "gpt-image-2", "n": 14, "size": "1536x864"},
        {"id": "b", "prompt": "q", "model": "gpt-image-2.6-flare", "n": 3, "quality": "low"},
    )
    out = tmp_path / "o"
    result = invoke("run", str(manifest), "--simulate", "--json", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["planned_requests"], summary["images_written"]) == (3, 17)
    assert summary["failed_requests"] == 0


def test_a_models_file_changes_the_plan_and_is_recorded(tmp_path: Path) -> None:
    """--models adds a model and changes another; the run records the file in its settings."""
    models = tmp_path / "ours.toml"
    models.write_text("[models.dall-e-2]\nmax_n = 2\n[models.flux-pro]\nmax_n = 4\nparams = {}\n")
    manifest = write(
        tmp_path / "m.jsonl",
        {"id": "a", "prompt": "p", "model": "dall-e-2", "n": 5},
        {"id": "b", "prompt": "p", "model": "flux-pro", "n": 8},
    )
    result = dry_run(manifest, "--models", str(models))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["models"]
    assert (plan["dall-e-2"]["requests"], plan["flux-pro"]["requests"]) == (3, 2)
    assert UNKNOWN_WARNING not in result.stderr
    refused = write(tmp_path / "r.jsonl", {"prompt": "p", "model": "flux-pro", "quality": "hd"})
    bad = dry_run(refused, "--models", str(models))
    assert bad.exit_code == 2 and "field 'quality': flux-pro does not take quality" in bad.stdout

    out = tmp_path / "run"
    ran = invoke(
        "run", str(manifest), "--simulate", "--quiet", "--out", str(out), "--models", str(models)
    )
    assert ran.exit_code == 0, ran.output
    settings = json.loads((out / "ledger.jsonl").read_text().splitlines()[0])["settings"]
    assert settings["models_file"] == str(models)
    status = invoke("status", str(out), "--json")
    assert json.loads(status.stdout)["ok_images"] == 13


def test_a_relative_models_file_is_recorded_so_status_counts_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--models ours.toml` given from the manifest's folder is recorded as a full path:
    status run from elsewhere still plans dall-e-2 at 4 a request (3 requests for 10)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "ours.toml").write_text("[models.dall-e-2]\nmax_n = 4\n")
    manifest = write(work / "m.jsonl", {"id": "a", "prompt": "p", "model": "dall-e-2", "n": 10})
    out = tmp_path / "out"
    monkeypatch.chdir(work)
    ran = invoke(
        "run", "m.jsonl", "--simulate", "--quiet", "--out", str(out), "--models", "ours.toml"
    )
    assert ran.exit_code == 0, ran.output
    monkeypatch.chdir(tmp_path)
    status = invoke("status", str(out), "--manifest", str(manifest), "--json")
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert (data["ok_requests"], data["ok_images"]) == (3, 10), data


def test_a_bad_models_file_exits_2_naming_file_and_entry(tmp_path: Path) -> None:
    """A bad field in the file is a usage error naming the file, the entry and the field."""
    models = tmp_path / "ours.toml"
    models.write_text("[models.dall-e-2]\nmax_n = 0\n")
    manifest = write(tmp_path / "m.jsonl", {"prompt": "p", "model": "dall-e-2"})
    result = dry_run(manifest, "--models", str(models))
    assert result.exit_code == 2
    assert f"models file {models}: models.dall-e-2.max_n: " in result.stderr


def test_the_settings_file_names_a_models_file_and_the_flag_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """models_file in cometbatch.toml is read relative to that file; --models replaces it."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "models.toml").write_text("[models.dall-e-2]\nmax_n = 2\n")
    (tmp_path / "conf" / "cometbatch.toml").write_text('models_file = "models.toml"\n')
    flag = tmp_path / "flag.toml"
    flag.write_text("[models.dall-e-2]\nmax_n = 5\n")
    manifest = write(tmp_path / "m.jsonl", {"prompt": "p", "model": "dall-e-2", "n": 5})
    config = ["--config", str(tmp_path / "conf" / "cometbatch.toml")]
    monkeypatch.chdir(tmp_path)
    from_file = dry_run(manifest, *config)
    assert from_file.exit_code == 0, from_file.output
    assert json.loads(from_file.stdout)["models"]["dall-e-2"]["requests"] == 3
    flagged = dry_run(manifest, *config, "--models", str(flag))
    assert json.loads(flagged.stdout)["models"]["dall-e-2"]["requests"] == 1
    (tmp_path / "conf" / "cometbatch.toml").write_text("models_file = 4\n")
    assert dry_run(manifest, *config).exit_code == 2


def test_models_command_lists_models_families_sources_and_dates(tmp_path: Path) -> None:
    """`cometbatch models` shows gpt-image-2, the gpt-image-* family and each source and date."""
    listed = invoke("models", "--json")
    assert listed.exit_code == 0, listed.output
    entries = {entry["name"]: entry for entry in json.loads(listed.stdout)}
    for name in ("gpt-image-2", "gpt-image-2-2026-04-21", "dall-e-3"):
        assert entries[name]["kind"] == "model"
        assert entries[name]["source"] and entries[name]["as_of"]
    family = entries["gpt-image-*"]
    assert family["kind"] == "family" and family["max_n"] == 10 and family["size_rule"]
    text = invoke("models").stdout
    assert "gpt-image-2-2026-04-21" in text and "families" in text and "gpt-image-*" in text
    assert "source: https://github.com/openai/openai-openapi" in text and "as of 2026-08-21" in text
    assert "any WIDTHxHEIGHT with sides divisible by 16" in text

    models = tmp_path / "ours.toml"
    models.write_text('[models.flux-pro]\nmax_n = 4\n[families."flux-*"]\nmax_n = 2\n')
    ours = {
        e["name"]: e for e in json.loads(invoke("models", "--json", "--models", str(models)).stdout)
    }
    assert ours["flux-pro"]["source"] == str(models) and ours["flux-pro"]["as_of"] is None
    assert ours["flux-*"]["kind"] == "family"
    models.write_text("[models.flux-pro]\nmax_n = -1\n")
    refused = invoke("models", "--models", str(models))
    assert refused.exit_code == 2 and "models.flux-pro.max_n" in refused.stderr


def test_the_engine_builds_its_registry_from_the_settings(tmp_path: Path) -> None:
    """Settings.models_file and model_overrides shape the engine's default registry."""
    models = tmp_path / "ours.toml"
    models.write_text("[models.dall-e-2]\nmax_n = 3\n[models.flux-pro]\nmax_n = 4\n")
    settings = Settings(models_file=str(models), model_overrides={"dall-e-2": {"max_n": 2}})
    engine = Engine(settings, out_dir=tmp_path / "o")
    assert engine.registry.get("flux-pro").max_n == 4
    assert engine.registry.get("dall-e-2").max_n == 2
    assert Engine(Settings(), out_dir=tmp_path / "p").registry.get("gpt-image-2").max_n == 10


@pytest.mark.parametrize(
    ("body", "n", "fmt"),
    [
        ({"model": "gpt-image-2", "prompt": "x", "n": 10, "size": "1536x864"}, 10, "png"),
        ({"model": "gpt-image-2-2026-04-21", "prompt": "x", "size": "3840x2160"}, 1, "png"),
        (
            {"model": "gpt-image-2.6-flare", "prompt": "x", "n": 3, "output_format": "webp"},
            3,
            "webp",
        ),
        ({"model": "dall-e-2", "prompt": "x", "quality": "auto"}, 1, "png"),
        ({"model": "dall-e-3", "prompt": "x", "quality": "auto"}, 1, "webp"),
    ],
)
def test_the_simulator_accepts_the_new_models(body: dict[str, Any], n: int, fmt: str) -> None:
    """gpt-image-2, its dated name and a family name answer b64 with usage; dall-e takes auto."""
    parsed = parse_request(body, ModelRegistry())
    assert isinstance(parsed, ImageRequest)
    assert (parsed.n, parsed.fmt) == (n, fmt)
    assert parsed.usage == body["model"].startswith("gpt-image")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "gpt-image-2", "prompt": "x", "size": "1000x1000"}, "divisible by 16"),
        ({"model": "gpt-image-2", "prompt": "x", "size": "4096x2304"}, "at most 3840"),
        ({"model": "gpt-image-2", "prompt": "x", "n": 11}, "Expected a value <= 10"),
        (
            {"model": "gpt-image-2", "prompt": "x", "response_format": "b64_json"},
            "Unknown parameter",
        ),
        ({"model": "gpt-image-2.6-flare", "prompt": "x", "style": "vivid"}, "Unknown parameter"),
        ({"model": "gpt-image-2.6-flare", "prompt": "x", "quality": "hd"}, "quality"),
    ],
)
def test_the_simulator_refuses_what_the_new_models_cannot_take(
    body: dict[str, Any], message: str
) -> None:
    """The simulated route answers 400 for what the rules refuse."""
    failure = parse_request(body, ModelRegistry())
    assert isinstance(failure, ApiFailure) and failure.status == 400
    assert message in failure.message
