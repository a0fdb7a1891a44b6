"""The command line as a user runs it: real subprocesses, the in-process simulator, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "jobs" / "demo.jsonl"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cometbatch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


@contextlib.contextmanager
def simulate_server(*options: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`cometbatch simulate` on an ephemeral loopback port, stopped afterwards; its base URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "cometbatch", "simulate", "--port", "0", *options],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    try:
        assert server.stderr is not None
        first = server.stderr.readline()
        base_url = first.rsplit(" ", 1)[-1].strip()
        assert base_url.startswith("http://127.0.0.1:"), first
        yield base_url
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)


def write_manifest(path: Path, jobs: Iterable[dict[str, Any]]) -> Path:
    """A JSONL manifest with one job per line."""
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def ledger_results(out: Path) -> list[dict[str, Any]]:
    events = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines() if x]
    return [e for e in events if e["event"] == "result"]


def planned_images(manifest: Path) -> set[tuple[str, int]]:
    from cometbatch import load_manifest

    return {(job.id, k) for job in load_manifest(manifest) for k in range(job.n)}


def images_on_disk(out: Path) -> Counter[tuple[str, int]]:
    found: Counter[tuple[str, int]] = Counter()
    for path in (out / "images").rglob("*"):
        if path.is_file():
            assert not path.name.endswith(".tmp"), path
            with Image.open(path) as image:
                image.load()
            found[(path.parent.name, int(path.stem))] += 1
    return found


def test_demo_run_then_rerun_sends_nothing(tmp_path: Path) -> None:
    """The README's main command completes; the same command again sends zero requests."""
    out = tmp_path / "out"
    first = cli("run", str(DEMO), "--simulate", "--out", str(out), "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["complete"] and summary["simulated"]
    assert summary["simulator_requests"] >= summary["planned_requests"] > 0
    assert set(images_on_disk(out)) == planned_images(DEMO)
    statuses = Counter(e["status"] for e in ledger_results(out))
    assert statuses == {"ok": summary["planned_requests"]}
    # The output layout is a contract: another version's run must find the same lock file;
    # metadata.jsonl names each image with its prompt for imagefolder.
    assert sorted(p.name for p in out.iterdir()) == [
        ".cometbatch.lock",
        "images",
        "ledger.jsonl",
        "metadata.jsonl",
    ]

    second = cli("run", str(DEMO), "--simulate", "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert "everything was already done" in second.stderr
    again = cli("run", str(DEMO), "--simulate", "--out", str(out), "--json")
    assert json.loads(again.stdout)["simulator_requests"] == 0


def test_bad_manifest_exits_2_naming_every_line(tmp_path: Path) -> None:
    """Invalid JSON, a missing prompt, an unknown field, n = 0 and a bad size: exit 2, all named."""
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(
        "\n".join(
            [
                '{"prompt": "fine"}',
                "{oops",
                '{"model": "dall-e-3"}',
                '{"prompt": "x", "colour": "red"}',
                '{"prompt": "x", "n": 0}',
                '{"prompt": "x", "model": "dall-e-2", "size": "1792x1024"}',
            ]
        )
        + "\n"
    )
    out = tmp_path / "out"
    result = cli("run", str(manifest), "--simulate", "--out", str(out))
    assert result.returncode == 2
    for fragment in (
        "line 2",
        "line 3, field 'prompt'",
        "line 4, field 'colour'",
        "line 5, field 'n'",
        "line 6, field 'size'",
    ):
        assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "ledger.jsonl").exists()


def test_a_bad_manifest_is_named_one_line_each_with_its_text_escaped(tmp_path: Path) -> None:
    """Each bad line gets a line of its own on stderr; a field name holding a newline and an
    escape code (the manifest's own text) is shown escaped, never as a line or a colour."""
    manifest = tmp_path / "bad.jsonl"
    forged = "a\nerror: forged\u001b[31m"
    manifest.write_text(
        "\n".join(['{"model": "dall-e-3"}', json.dumps({"prompt": "x", forged: 1})]) + "\n"
    )
    result = cli("run", str(manifest), "--simulate", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and lines[0].endswith("2 invalid manifest line(s):")
    assert lines[1] == "  line 1, field 'prompt': Field required"
    assert lines[2].startswith("  line 2, field 'a\\nerror: forged\\x1b[31m': unknown field")
    assert len(lines) == 3
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", result.stderr)


def test_the_runner_loads_where_there_is_no_sighup() -> None:
    """Where the signal module has no SIGHUP (Windows), the runner loads and stops on the
    signals there are."""
    code = (
        "import signal; del signal.SIGHUP; import cometbatch.cli.runner as r; "
        "print(sorted(s.name for s in r.STOP_SIGNALS))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["['SIGINT',", "'SIGTERM']"]


def test_missing_key_is_a_clear_usage_error(tmp_path: Path) -> None:
    """Without COMETAPI_KEY and without --simulate the run refuses with exit 2 and says why."""
    env = {k: v for k, v in os.environ.items() if k != "COMETAPI_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "cometbatch", "run", str(DEMO), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "COMETAPI_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigint_midway_then_rerun_gives_every_image_once(tmp_path: Path) -> None:
    """Ctrl-C part-way exits 130; the rerun completes with every image once and no key ok twice."""
    manifest = write_manifest(
        tmp_path / "many.jsonl",
        ({"id": f"m{i}", "prompt": f"picture {i}", "model": "qwen-image"} for i in range(120)),
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cometbatch",
            "run",
            str(manifest),
            "--simulate",
            "--out",
            str(out),
            "--concurrency",
            "4",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    ledger = out / "ledger.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ledger.exists() and ledger.read_text().count('"event":"result"') >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    partial = ledger_results(out)
    done = {e["key"] for e in partial if e["status"] == "ok"}
    assert 10 <= len(done) < 120, partial
    assert json.loads(ledger.read_text().splitlines()[-1])["event"] == "end"

    rerun = cli("run", str(manifest), "--simulate", "--out", str(out), "--json")
    assert rerun.returncode == 0, rerun.stderr
    # Exactly the keys not recorded ok are sent again: nothing done is paid for twice.
    assert json.loads(rerun.stdout)["simulator_requests"] == 120 - len(done), (partial, stderr)
    oks = Counter(e["key"] for e in ledger_results(out) if e["status"] == "ok")
    assert len(oks) == 120 and max(oks.values()) == 1
    on_disk = images_on_disk(out)
    assert set(on_disk) == planned_images(manifest)
    assert max(on_disk.values()) == 1


def test_models_and_status_commands(tmp_path: Path) -> None:
    """`models` lists the registry; `status --json` counts what a finished run holds."""
    listed = cli("models", "--json")
    assert listed.returncode == 0
    names = {spec["name"] for spec in json.loads(listed.stdout)}
    assert {"dall-e-2", "dall-e-3", "gpt-image-1", "qwen-image"} <= names

    out = tmp_path / "out"
    assert cli("run", str(DEMO), "--simulate", "--out", str(out), "--quiet").returncode == 0
    status = cli("status", str(out), "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["ok_images"] == len(planned_images(DEMO))
    assert data["failed_requests"] == 0
    assert data["last_run_ended"] is True


def test_status_of_an_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    """`status` on a folder with no ledger says so and exits 2."""
    result = cli("status", str(tmp_path))
    assert result.returncode == 2
    assert "nothing has run there yet" in result.stderr


def test_faulty_server_run_completes_and_a_400_exits_1(tmp_path: Path) -> None:
    """Against `cometbatch simulate` with 429s (with/without Retry-After) and 5xx, 210 requests
    all land; one content-policy 400 is recorded once, not retried, and the run exits 1."""
    manifest = tmp_path / "m.jsonl"
    jobs = [{"id": f"f{i}", "prompt": f"scene {i}", "model": "qwen-image"} for i in range(210)]
    jobs.append({"id": "nope", "prompt": "something FORBIDDEN", "model": "dall-e-3"})
    write_manifest(manifest, jobs)
    out = tmp_path / "out"
    faults = ["--seed", "3", "--rate-429", "0.08", "--rate-429-bare", "0.04", "--rate-5xx", "0.08"]
    with simulate_server(*faults, "--content-policy-marker", "FORBIDDEN") as base_url:
        result = cli(
            "run", str(manifest), "--base-url", base_url, "--out", str(out),
            "--concurrency", "32", "--json",
            env={"COMETAPI_KEY": "sk-test-key"},
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["ok_requests"], summary["failed_requests"]) == (210, 1)
    assert summary["retries"] > 0
    failed = [e for e in ledger_results(out) if e["status"] == "failed"]
    assert len(failed) == 1
    error = failed[0]["error"]
    assert (failed[0]["key"], failed[0]["attempts"]) == ("nope#0", 1)
    assert (error["kind"], error["status"], error["retryable"]) == ("content_policy", 400, False)
    assert error["request_id"] and "safety system" in error["message"]
    assert len(images_on_disk(out)) == 210


def test_second_ctrl_c_quits_at_once_and_the_rerun_completes(tmp_path: Path) -> None:
    """With slow requests in flight, a second SIGINT exits 130 at once; the rerun finishes."""
    with simulate_server("--latency", "30") as base_url:
        manifest = write_manifest(
            tmp_path / "m.jsonl", ({"id": f"s{i}", "prompt": f"slow {i}"} for i in range(6))
        )
        out = tmp_path / "out"
        args = [sys.executable, "-m", "cometbatch", "run", str(manifest), "--base-url", base_url]
        proc = subprocess.Popen(
            [*args, "--out", str(out), "--quiet"],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "COMETAPI_KEY": "sk-test"},
        )
        # The run event is written after the Ctrl-C handlers are in place.
        ledger = out / "ledger.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            ledger.exists() and '"event":"run"' in ledger.read_text()
        ):
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 130, stderr
        assert time.monotonic() - started < 10
        assert "Traceback" not in stderr
        lines = (out / "ledger.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["event"] == "end"
        assert json.loads(lines[-1])["summary"]["interrupted"] is True
        # All six were sent and cut off: counted, and said, as possibly billed.
        assert json.loads(lines[-1])["summary"]["cut_off_requests"] == 6
        assert "6 request(s) still in flight may have been billed" in stderr
        assert ledger_results(out) == []
    rerun = cli("run", str(manifest), "--simulate", "--out", str(out), "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["ok_requests"] == 6


def test_an_internal_error_is_one_plain_line(monkeypatch: Any) -> None:
    """An unexpected exception (a bug) is reported in one line with exit 1, not a traceback."""
    from click.testing import CliRunner

    from cometbatch.cli import runner
    from cometbatch.cli.main import main

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "run_manifest", broken)
    result = CliRunner().invoke(main, ["run", str(DEMO), "--simulate", "--quiet"])
    assert result.exit_code == 1
    assert "internal error (a bug in cometbatch" in result.output
    assert "RuntimeError('boom')" in result.output
    assert "Traceback" not in result.output


def test_a_small_ipm_works_for_one_image_requests(tmp_path: Path) -> None:
    """--ipm below ten is accepted when no request carries more images than that."""
    manifest = tmp_path / "one.jsonl"
    manifest.write_text('{"id": "solo", "prompt": "one picture", "model": "dall-e-3"}\n')
    result = cli("run", str(manifest), "--simulate", "--ipm", "5", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    refused = cli("run", str(DEMO), "--simulate", "--ipm", "5", "--out", str(tmp_path / "d"))
    assert refused.returncode == 2
    assert "most images one request can carry (10)" in refused.stderr


def test_an_unusable_output_folder_is_a_clear_usage_error(tmp_path: Path) -> None:
    """--out below a regular file names the folder and the reason, and exits 2."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    result = cli("run", str(DEMO), "--simulate", "--out", str(blocker / "sub"))
    assert result.returncode == 2, result.stderr
    assert "cannot use" in result.stderr and "as the output folder" in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


def test_json_is_printed_even_when_the_run_stops_on_an_error(tmp_path: Path) -> None:
    """With --json, a run stopped by a rejected key still prints one JSON object (exit 2)."""
    with simulate_server("--api-key-env", "SIMKEY", env={"SIMKEY": "sk-right"}) as base_url:
        out = tmp_path / "out"
        result = cli(
            "run", str(DEMO), "--base-url", base_url, "--out", str(out), "--json",
            env={"COMETAPI_KEY": "sk-wrong"},
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    data = json.loads(result.stdout)
    assert "rejected the key" in data["error"]
    assert data["ok_requests"] == 0 and data["complete"] is False
    assert "sk-wrong" not in result.stdout + result.stderr


def test_high_concurrency_works_under_a_low_open_file_limit(tmp_path: Path) -> None:
    """With a soft limit of 256 open files, --concurrency 200 --simulate still completes."""
    import resource

    def low_limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    manifest = write_manifest(
        tmp_path / "many.jsonl",
        ({"id": f"h{i}", "prompt": f"p{i}", "response_format": "b64_json"} for i in range(400)),
    )
    result = subprocess.run(
        [sys.executable, "-m", "cometbatch", "run", str(manifest), "--simulate",
         "--concurrency", "200", "--out", str(tmp_path / "o"), "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, preexec_fn=low_limit,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok_requests"] == 400


def test_model_override_changes_the_fan_out_and_bad_ones_are_usage_errors(tmp_path: Path) -> None:
    """--model-override dall-e-2.max_n=2 splits n=5 into 3 requests; a malformed one exits 2."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "x", "prompt": "p", "model": "dall-e-2", "n": 5}\n')
    out = str(tmp_path / "o")
    result = cli("run", str(manifest), "--simulate", "--out", out, "--json",
                 "--model-override", "dall-e-2.max_n=2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["planned_requests"] == 3
    for bad, words in [("dall-e-2.max_n=0", "bad override"), ("max_n=2", "MODEL.FIELD=VALUE")]:
        refused = cli("run", str(manifest), "--simulate", "--out", out, "--model-override", bad)
        assert refused.returncode == 2, refused.stderr
        assert words in refused.stderr


def test_parse_overrides_reads_json_values_and_plain_strings() -> None:
    """Values that parse as JSON become numbers or lists; anything else stays a string."""
    from cometbatch.models.registry import parse_overrides

    assert parse_overrides(("gpt-image-1.max_n=4", 'my.model.sizes=["512x512"]', "m.name=x")) == {
        "gpt-image-1": {"max_n": 4},
        "my.model": {"sizes": ["512x512"]},
        "m": {"name": "x"},
    }


def test_an_empty_manifest_says_there_is_nothing_to_do(tmp_path: Path) -> None:
    """A manifest of only comments and blank lines exits 0 and says it had no jobs."""
    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("# nothing yet\n\n")
    result = cli("run", str(manifest), "--simulate", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "nothing to do: the manifest has no jobs" in result.stderr


def test_a_dry_run_refuses_what_the_run_would_refuse() -> None:
    """Plain http to a remote host is refused by --dry-run too (nothing is sent either way)."""
    done = cli("run", str(DEMO), "--dry-run", "--base-url", "http://192.0.2.1/v1")
    assert done.returncode == 2
    assert "clear text to 192.0.2.1" in done.stderr and "--allow-insecure-http" in done.stderr
    assert "Traceback" not in done.stderr


def test_concurrency_auto_runs_within_its_bounds_and_bad_bounds_are_usage_errors(
    tmp_path: Path,
) -> None:
    """--concurrency auto records auto with --max-concurrency as the bound; misuse exits 2."""
    out = tmp_path / "o"
    bounds = ["--concurrency", "auto", "--max-concurrency", "40", "--min-concurrency", "2"]
    result = cli("run", str(DEMO), "--simulate", "--out", str(out), "--json", *bounds)
    assert result.returncode == 0, result.stderr
    run_event = json.loads((out / "ledger.jsonl").read_text().splitlines()[0])
    settings = run_event["settings"]
    assert (settings["auto_concurrency"], settings["concurrency"]) == (True, None)
    assert (settings["max_concurrency"], settings["min_concurrency"]) == (40, 2)
    for args, words in [
        (["--concurrency", "8", "--max-concurrency", "40"], "(--max-concurrency) bounds"),
        (["--max-concurrency", "40"], "(16 without rpm/ipm) is its own maximum"),
        (["--rpm", "600", "--min-concurrency", "2000"], "above the maximum concurrency (1000)"),
        (["--concurrency", "lots"], "neither a whole number nor 'auto'"),
        (["--concurrency", "0"], "--concurrency: Input should be greater than or equal to 1"),
        (["--concurrency", "auto", "--min-concurrency", "300"], "above the maximum"),
    ]:
        refused = cli("run", str(DEMO), "--simulate", "--out", str(tmp_path / "x"), *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert words in refused.stderr, refused.stderr


def test_concurrency_fields_map_the_options_to_settings() -> None:
    """auto and --max-concurrency map to their fields; a number is the concurrency; nothing
    given leaves it to the settings (16, or following --rpm/--ipm)."""
    from cometbatch.cli.options import concurrency_fields as _concurrency_fields

    assert _concurrency_fields("auto", None, None) == {"auto_concurrency": True}
    assert _concurrency_fields("auto", 4, 500) == {
        "auto_concurrency": True,
        "max_concurrency": 500,
        "min_concurrency": 4,
    }
    assert _concurrency_fields(32, None, None) == {"concurrency": 32}
    assert _concurrency_fields(None, None, None) == {}
    assert _concurrency_fields(None, None, 2000) == {"max_concurrency": 2000}


def run_in_terminal(*args: str, env: dict[str, str]) -> str:
    """Run the CLI on a pseudo-terminal (so it draws its live display); everything it wrote."""
    import pty
    import select

    master, slave = pty.openpty()
    base = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cometbatch", *args],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
        env={**base, "TERM": "xterm-256color", "COLUMNS": "120", **env},
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=30) == 0, b"".join(chunks)
    finally:
        os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_no_color_means_no_style_codes_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal the display is coloured; with NO_COLOR=1 not one colour/style code is
    written (the live display still moves the cursor to redraw itself)."""
    import re

    style = re.compile(r"\x1b\[[0-9;]*m")
    coloured = run_in_terminal("run", str(DEMO), "--simulate", "--out", str(tmp_path / "a"), env={})
    assert style.search(coloured), coloured
    plain = run_in_terminal(
        "run", str(DEMO), "--simulate", "--out", str(tmp_path / "b"), env={"NO_COLOR": "1"}
    )
    assert "image(s) written" in plain
    assert not style.search(plain), plain


def test_off_a_terminal_nothing_but_plain_text_is_written(tmp_path: Path) -> None:
    """On pipes (and with NO_COLOR) stdout and stderr hold no escape sequence at all."""
    out = tmp_path / "o"
    result = cli("run", str(DEMO), "--simulate", "--out", str(out), "-v", env={"NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    status = cli("status", str(out), env={"NO_COLOR": "1"})
    assert "\x1b" not in result.stdout + result.stderr + status.stdout + status.stderr


def test_a_rate_alone_is_followed_and_the_summary_gives_the_rate_against_it(
    tmp_path: Path,
) -> None:
    """`run --rpm N` without --concurrency follows the rate; the summary gives the rate sent
    against the limit and what held it back, and the run event records no fixed concurrency."""
    out = tmp_path / "o"
    # 80 requests at 600/min: a burst of half a second's worth, then 7.5 s paced.
    manifest = write_manifest(
        tmp_path / "m.jsonl", ({"id": f"r{i}", "prompt": f"p {i}"} for i in range(80))
    )
    result = cli("run", str(manifest), "--simulate", "--out", str(out), "--rpm", "600", "--quiet")
    assert result.returncode == 0, result.stderr
    rate = [line for line in result.stderr.splitlines() if line.startswith("rate: ")]
    assert len(rate) == 1 and " requests/min of 600 (" in rate[0], result.stderr
    assert "held back by the rate limit" in rate[0]
    run_event = json.loads((out / "ledger.jsonl").read_text().splitlines()[0])
    assert (run_event["settings"]["concurrency"], run_event["settings"]["rpm"]) == (None, 600)


def test_quiet_prints_only_the_summary(tmp_path: Path) -> None:
    """--quiet: no progress and no warnings, only the summary lines (errors would show too)."""
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"id": "u", "prompt": "p", "model": "some-new-model"}]
    )
    loud = cli("run", str(manifest), "--simulate", "--out", str(tmp_path / "a"))
    assert "not in cometbatch's registry" in loud.stderr
    quiet = cli("run", str(manifest), "--simulate", "--out", str(tmp_path / "b"), "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    assert lines[0].startswith("1 image(s) written") and lines[1].startswith("requests: 1 ok")
    assert all(not line.startswith(("cometbatch:", "images ")) for line in lines)
    assert quiet.stdout == ""


def test_verbose_shows_each_retry_with_its_reason(tmp_path: Path) -> None:
    """-v logs one line per retry with the error that caused it; without -v there are none."""
    manifest = write_manifest(
        tmp_path / "m.jsonl", ({"id": f"v{i}", "prompt": f"p {i}", "model": "qwen-image"}
                               for i in range(8))
    )  # fmt: skip
    faults = ["--rate-429", "0.5", "--retry-after", "0", "--seed", "7"]
    env = {"COMETAPI_KEY": "sk-test-verbose"}
    with simulate_server(*faults) as base_url:
        args = ["run", str(manifest), "--base-url", base_url, "--json"]
        loud = cli(*args, "--out", str(tmp_path / "a"), "-v", env=env)
        quiet = cli(*args, "--out", str(tmp_path / "b"), env=env)
    assert loud.returncode == 0, loud.stderr
    retries = [line for line in loud.stderr.splitlines() if "INFO: retry " in line]
    assert len(retries) == json.loads(loud.stdout)["retries"] > 0
    assert all(re.search(r"retry \d+ of job v\d \(key v\d#0\): 429 rate_limit, waiting "
                         r"0\.0 s \(Retry-After\): upstream load is saturated", line)
               for line in retries)  # fmt: skip
    assert "retry " not in quiet.stderr
    assert "sk-test-verbose" not in loud.stdout + loud.stderr


def pipe_manifest(tmp_path: Path, count: int) -> Path:
    jobs = ({"id": f"p{i}", "prompt": f"pipe {i}", "model": "qwen-image"} for i in range(count))
    return write_manifest(tmp_path / "m.jsonl", jobs)


def assert_finished(out: Path, requests: int) -> None:
    """The ledger holds an ok line for every request, then the end line of a complete run."""
    lines = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    oks = {e["key"] for e in lines if e["event"] == "result" and e["status"] == "ok"}
    assert len(oks) == requests
    assert lines[-1]["event"] == "end" and lines[-1]["summary"]["complete"] is True


def test_a_reader_that_goes_away_stops_the_display_never_the_run(tmp_path: Path) -> None:
    """`cometbatch run … 2>&1 | head -c 10`: the reader leaves after 10 bytes of the first
    progress line; the run still completes: exit 0, every result line and the end line."""
    manifest, out = pipe_manifest(tmp_path, 48), tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cometbatch", "run", str(manifest), "--simulate",
         "--out", str(out), "--concurrency", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert_finished(out, 48)


def test_a_closed_stdout_leaves_the_exit_code_true(tmp_path: Path) -> None:
    """`cometbatch run --json | true`: the JSON has no reader; the run completes, exit 0."""
    manifest, out = pipe_manifest(tmp_path, 3), tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cometbatch", "run", str(manifest), "--simulate",
         "--out", str(out), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    assert_finished(out, 3)
