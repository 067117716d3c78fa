"""`videoqa doctor`: one line per check, ok / warning / problem, as text or one JSON object; exit 0 when a default
run can work, 1 when a check it needs is a problem. Offline, no model loaded."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import pytest

from conftest import assert_clean_failure, run_videoqa

STATUSES = {"ok", "warning", "problem"}
PACKAGES = {"torch": "torch", "transformers": "transformers", "PyAV": "av", "bitsandbytes": "bitsandbytes",
            "torchao": "torchao"}


def checks(result) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(result.out)["checks"]}


@pytest.fixture
def doctor(cli):
    """`videoqa doctor --json ARGS`: the result, and its checks by name."""
    def run(*args):
        result = cli("doctor", "--json", *args)
        return result, checks(result)

    return run


def test_json_is_one_object_of_checks_each_ok_warning_or_problem(doctor):
    result, found = doctor()
    assert result.code == 0 and result.err == "", result
    report = json.loads(result.out)
    assert set(report) == {"checks", "ok"} and report["ok"] is True
    assert result.out.count("\n") == 1  # one line
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail"} and check["status"] in STATUSES and check["detail"]
    assert len(found) == len(report["checks"])  # names are unique
    assert {"python", *PACKAGES, "mps", "cpu bfloat16", "ram", "video decoding", "hf cache", "offline",
            "cached presets", "fits", "does not fit", "default model", "feature cache", "history"} <= set(found)
    assert "cuda" in found or "cuda:0" in found


def test_versions_are_the_installed_ones(doctor):
    _, found = doctor()
    assert found["python"]["detail"].split()[0] == platform.python_version()
    for name, dist in PACKAGES.items():
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            assert found[name]["status"] != "ok" and "not installed" in found[name]["detail"]
            continue
        assert found[name]["detail"].split()[0] == version, found[name]


def test_pyav_writes_and_reads_back_a_video_here(doctor):
    _, found = doctor()
    assert found["video decoding"]["status"] == "ok" and "16 frames" in found["video decoding"]["detail"]


def test_a_real_process_exits_0_and_finds_the_cpus_bfloat16_as_proc_cpuinfo_says():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    native = bool(set(cpuinfo.read_text().split()) & {"avx512_bf16", "amx_bf16", "bf16"})  # bf16: Arm's flag
    done = run_videoqa("doctor", "--json", text=True)  # in-process runs are told the CPU has no bfloat16
    assert done.returncode == 0 and done.stderr == "", done
    line = {c["name"]: c for c in json.loads(done.stdout)["checks"]}["cpu bfloat16"]
    assert line["status"] == "ok" and line["detail"].startswith("yes" if native else "no"), line


def test_nothing_fits_is_a_problem_and_exit_1(doctor, cli):
    result, found = doctor("--max-memory", "1MB")
    assert result.code == 1 and result.err == "", result
    assert json.loads(result.out)["ok"] is False
    assert found["fits"]["status"] == "problem" and "1.0 MB" in found["fits"]["detail"]
    assert found["does not fit"]["status"] == "warning" and found["default model"]["status"] == "warning"
    assert cli("doctor", "--max-memory", "1MB").code == 1  # the text form too


def test_a_probe_that_fails_is_a_problem_line_not_a_traceback(doctor, monkeypatch):
    from videoqa import doctor as module

    def broken(path):
        raise RuntimeError("no encoder\nat all")

    monkeypatch.setattr(module, "roundtrip", broken)
    result, found = doctor()
    assert result.code == 1 and result.err == "", result  # a default run needs video decoding
    assert found["video decoding"] == {"name": "video decoding", "status": "problem",
                                       "detail": "RuntimeError: no encoder at all"}


def test_text_is_one_line_per_check_and_nothing_on_stderr(cli, doctor):
    _, found = doctor()
    result = cli("doctor")
    assert result.code == 0 and result.err == "", result
    lines = result.out.splitlines()
    assert len(lines) == len(found) and "\x1b" not in result.out  # no colours: stdout is not a terminal
    for line, check in zip(lines, found.values()):
        status, rest = line.split(maxsplit=1)
        name, detail = rest[:len(check["name"])], rest[len(check["name"]):].lstrip()
        assert (status, name) == (check["status"], check["name"])  # the detail's figures (times, RAM) move
        assert detail.split()[0] == check["detail"].split()[0], (line, check)


def test_colours_only_for_a_terminal_and_never_with_no_color(monkeypatch):
    from videoqa.doctor import Check, text

    found = [Check("a", "ok", "fine"), Check("b", "problem", "broken")]
    assert "\x1b[" in text(found, colour=True) and "\x1b[" not in text(found, colour=False)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in text(found, colour=True)


def test_history_none_yet_then_its_size(doctor, tmp_path):
    _, found = doctor()
    assert found["history"]["status"] == "ok" and found["history"]["detail"].startswith("no history yet")
    database = tmp_path / "data" / "videoqa" / "logs.db"  # XDG_DATA_HOME: the user_dirs fixture's
    database.parent.mkdir(parents=True)
    database.write_bytes(b"\0" * 1_500_000)
    _, found = doctor()
    assert found["history"] == {"name": "history", "status": "ok", "detail": f"{database}: 1.5 MB"}


def test_feature_cache_size_and_bound(doctor, monkeypatch):
    monkeypatch.setenv("VIDEOQA_CACHE_MAX_MB", "100")
    _, found = doctor()
    assert found["feature cache"]["status"] == "ok" and found["feature cache"]["detail"].endswith(
        "0 entries, 0.0 MiB of 100 MiB")
    monkeypatch.setenv("VIDEOQA_CACHE_MAX_MB", "lots")  # runs warn and use the default bound
    result, found = doctor()
    assert result.code == 0 and found["feature cache"]["status"] == "warning"


def test_a_bad_max_memory_is_bad_usage(cli):
    assert_clean_failure(cli("doctor", "--max-memory", "lots"), 2, "--max-memory")


@pytest.mark.parametrize("capability, built, runs", [
    ((8, 0), ["sm_80", "sm_90"], True),
    ((8, 6), ["sm_80", "sm_90"], True),  # a binary runs on later minor versions of its major
    ((6, 1), ["sm_70", "sm_80"], False),
    ((12, 0), ["sm_80", "sm_90"], False),
    ((12, 0), ["sm_80", "compute_90"], True),  # PTX: compiled on the fly
    ((7, 5), [], True),  # unknown: assumed
])
def test_which_cuda_devices_this_torch_runs_on(capability, built, runs):
    from videoqa.doctor import runs_on

    assert runs_on(capability, built) is runs
