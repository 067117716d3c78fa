"""`videoqa caption --ray`: on the local Ray runtime a run starts (its temp dir the test's own), 6 real videos and 2
broken files get the records local caption writes (only the order may differ); nothing of Ray's on stderr; no Ray
process left afterwards, also after SIGTERM and after the driver is killed (then --resume loses and repeats
nothing). On one cluster for the module (`ray start --head`, 2 CPUs, no dashboard), attached by HOST:PORT: a model
actor killed mid-run is replaced and every video written once; timeline and eval write their local records. A wrong
address ends with one line; without the extra, one line names it."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import assert_clean_failure, asset, needs_assets, run_videoqa
from videoqa.errors import Exit

pytest.importorskip("ray", reason="--ray needs the ray extra")
pytestmark = needs_assets
REAL = ["videollava_sample_demo_1.mp4", "videollava_sample_demo_3.mp4", "videollava_sample_demo_9.mp4",
        "videollama2_1034346401.mp4", "llavanext_xU25MMA2N4aVtYay.mp4", "videollava_sample_demo_22.mp4"]
SAME = ("video", "question", "answer", "tokens", "frames", "error")  # what --ray writes as local caption does
# float32 everywhere: the in-process runs' --dtype auto is told the CPU has no bfloat16 (conftest), real processes not
TOKENS = "150"  # long enough answers that a run can be interrupted while it is answering


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for name in REAL:
        (folder / name).symlink_to(asset(f"videos/{name}"))
    (folder / "notes.mp4").write_text("not a video\n")
    (folder / "cut.mp4").write_bytes(asset(f"videos/{REAL[0]}").read_bytes()[:4000])  # a truncated file
    return folder


@pytest.fixture(scope="module")
def local(clips, tiny_model, tmp_path_factory) -> dict:
    """Local caption's records of the clips, by video."""
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    done = run_videoqa("caption", clips, "-m", tiny_model, "--dtype", "float32", "-n", TOKENS, "-b", 2, "--out", out)
    assert done.returncode == Exit.SOME_FAILED, done.stderr
    return by_video(out)


CLUSTER = "VIDEOQA_TEST_CLUSTER"  # in the environment of the module's cluster's processes


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster on this machine for the module's attaching runs: its HOST:PORT."""
    folder = tempfile.mkdtemp(prefix="vq-rc-", dir="/tmp")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray = [str(Path(sys.executable).parent / "ray")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", CLUSTER: "1"}
    subprocess.run([*ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={folder}"], env=env, check=True, capture_output=True)
    yield f"127.0.0.1:{port}"
    subprocess.run([*ray, "stop", "--force"], env=env, capture_output=True)


@pytest.fixture
def ray_env():
    """Ray's files under a short folder of the test's own (its sockets' paths have a length limit)."""
    folder = tempfile.mkdtemp(prefix="vq-ray-", dir="/tmp")
    yield {"RAY_TMPDIR": folder}
    left = ray_processes()
    assert not left, f"a Ray process outlived its run: {left}"


def by_video(out: Path) -> dict:
    records = [json.loads(line) for line in out.read_text().splitlines() if line]
    found = {r["video"]: {k: r[k] for k in SAME} for r in records}
    assert len(found) == len(records), "a video written twice"
    return found


def ray_processes(ending: bool = True) -> list[tuple[int, str]]:
    """(pid, command line) of Ray's processes on this machine; `ending`: after up to 15 s for them to end."""
    for _ in range(150 if ending else 1):
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(name in line for name in ("raylet", "gcs_server", "ray::", "DashboardAgent", "RuntimeEnvAgent",
                                              "default_worker.py")) and not of_the_cluster(pid):
                found.append((int(pid), line))
        if not found or not ending:
            return found
        time.sleep(0.1)
    return found


def of_the_cluster(pid: str) -> bool:
    try:
        return f"{CLUSTER}=1".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def started(args: list, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "videoqa", *map(str, args)]
    return subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def first_record(out: Path, process: subprocess.Popen) -> None:
    while not (out.exists() and out.read_text().count("\n")):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)


def test_ray_writes_local_captions_records_and_nothing_of_its_own(clips, local, tiny_model, tmp_path, ray_env):
    out = tmp_path / "ray.jsonl"
    done = run_videoqa("caption", clips, "-m", tiny_model, "--dtype", "float32", "-n", TOKENS, "-b", 2, "--ray",
                       "--ray-workers", 1,
                       "--out", out, env=ray_env)
    assert done.returncode == Exit.SOME_FAILED, done.stderr
    assert by_video(out) == local and len(local) == 8
    assert {v for v, r in local.items() if r["error"]} == {str(clips / "notes.mp4"), str(clips / "cut.mp4")}
    assert done.stdout == b""
    lines = done.stderr.decode().strip().splitlines()
    assert [line.split()[0] for line in lines] == ["done", "failed", "skipped", "videos/s"], lines  # the summary only


def test_a_killed_model_actor_is_replaced_and_every_video_written_once(clips, local, tiny_model, tmp_path, cluster):
    out = tmp_path / "ray.jsonl"
    run = started(["caption", clips, "-m", tiny_model, "--dtype", "float32", "-n", TOKENS, "-b", 1, "--ray", cluster,
                   "--out", out], {})
    first_record(out, run)
    actors = [int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if of_the_cluster(pid) and
              b"MapWorker(MapBatches(Answerer" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert actors
    os.kill(actors[0], signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode == Exit.SOME_FAILED, err
    assert by_video(out) == local  # every video once, with local caption's answer


def test_a_driver_killed_mid_run_then_resumed_loses_and_repeats_nothing(clips, local, tiny_model, tmp_path,
                                                                        ray_env):
    out = tmp_path / "ray.jsonl"
    args = ["caption", clips, "-m", tiny_model, "--dtype", "float32", "-n", TOKENS, "-b", 1, "--ray", "--out", out]
    run = started(args, ray_env)
    first_record(out, run)
    run.kill()
    run.communicate()
    core = lambda: [line for _, line in ray_processes(ending=False) if "raylet" in line or "gcs_server" in line]
    for _ in range(150):  # the driver's death ends the runtime it started (up to 15 s)
        if not core():
            break
        time.sleep(0.1)
    assert not core()
    left = ray_processes(ending=False)  # Ray's agents may outlive a killed driver a while (known): ended here
    for pid, _ in left:  # the killed run's agents (the module's cluster is told apart by ray_processes)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone by now
            pass
    written = len(by_video(out))
    assert 1 <= written < 8
    resumed = run_videoqa(*args, "--resume", env=ray_env)
    assert resumed.returncode == Exit.SOME_FAILED, resumed.stderr
    assert by_video(out) == local
    assert f"skipped {written}" in " ".join(resumed.stderr.decode().split())


def test_a_wrong_address_ends_with_one_line(clips, tiny_model, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = run_videoqa("caption", clips, "-m", tiny_model, "--ray", f"127.0.0.1:{port}", "--out", tmp_path / "x")
    assert done.returncode == Exit.DEVICE and done.stdout == b""
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "no Ray cluster" in lines[0], lines
    assert not (tmp_path / "x").exists() or (tmp_path / "x").read_text() == ""


def test_without_the_extra_ray_names_the_command(cli, clips, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it raises ImportError
    assert_clean_failure(cli("caption", clips, "-m", tiny_model, "--ray"), 2, "pip install 'videoqa[ray]'")


def test_timeline_and_eval_on_ray_write_their_local_records(cli, tiny_model, tmp_path, cluster):
    """Segments (each read on its own by a worker, not by one pass over the file) and benchmark items (a
    multiple-choice one, an open one, a window, a missing video) get local timeline's and eval's records."""
    video = asset(f"videos/{REAL[5]}")
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(item) for item in [
        {"video": str(asset(f"videos/{REAL[0]}")), "question": "What is it?", "choices": ["a baby", "a dog"],
         "answer": "a baby"},
        {"video": str(asset(f"videos/{REAL[1]}")), "question": "What happens?", "answer": "nothing"},
        {"video": str(asset(f"videos/{REAL[2]}")), "question": "What happens here?", "start": 1, "end": 3},
        {"video": str(tmp_path / "missing.mp4"), "question": "What?"}]) + "\n")
    for command, key in ((["timeline", video, "--segments", 3], "start"), (["eval", items], "number")):
        found = {}
        for where in ("local", "ray"):
            out = tmp_path / f"{command[0]}-{where}.jsonl"
            args = [*command, "-m", tiny_model, "--dtype", "float32", "-n", 6, "--out", out,
                    *(["--ray", cluster] if where == "ray" else [])]
            code = run_videoqa(*args).returncode if where == "ray" else cli(*args).code
            assert code == (Exit.OK if command[0] == "timeline" else Exit.SOME_FAILED), (command, where)
            records = [json.loads(line) for line in out.read_text().splitlines()]
            found[where] = {r[key]: {k: v for k, v in r.items() if k != "timings"} for r in records}
        assert found["ray"] == found["local"] and len(found["local"]) in (3, 4)


def test_sigterm_stops_after_the_record_in_flight_and_ends_the_runtime(clips, local, tiny_model, tmp_path, ray_env):
    out = tmp_path / "ray.jsonl"
    run = started(["caption", clips, "-m", tiny_model, "--dtype", "float32", "-n", TOKENS, "-b", 1, "--ray",
                   "--out", out], ray_env)
    first_record(out, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == Exit.TERMINATED, err
    written = by_video(out)
    assert 1 <= len(written) < 8 and all(local[video] == rec for video, rec in written.items())
    assert "done" in err.decode()  # the summary of what was written
