"""`pack --ray` on a local 2-CPU Ray cluster, started once for the module: the dataset equals a
single-machine pack sample for sample (content checksums); a bad volume is a report line and its task
goes on; --on-error fail stops; a task no node can hold is refused; a killed task is retried; a task
that keeps raising reports each of its inputs; a killed driver resumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from packing_inputs import BAD_INPUTS, final_status, report, write_big_input, write_mixed_inputs

import sslmed
from sslmed.errors import ConfigError, VolumeError
from sslmed.io.manifest import load_manifest, sample_checksums, verify
from sslmed.io.pack import pack, unique_key
from sslmed.io.pack_ray import TASK_RETRIES, pack_task
from sslmed.io.readers import find_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_address():
    """The address of a private local cluster (2 CPUs); this process stays connected to it."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, _temp_dir=temp_dir,
             log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_mixed_inputs(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def with_big(tmp_path_factory, inputs) -> tuple[list[Path], Path]:
    """The inputs plus one that takes about a second, last; and their single-machine pack."""
    root = tmp_path_factory.mktemp("big")
    sources = [inputs, write_big_input(root)]
    pack(sources, root / "single")
    return sources, root / "single"


def running_pack_tasks() -> list[psutil.Process]:
    """This cluster's worker processes busy with a pack task (Ray titles a busy worker ray::<task>)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name() == "ray::pack_task":
                found.append(process)
        except psutil.Error:
            continue
    return found


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def assert_same_dataset(out: Path, reference: Path, sources: list[Path]) -> None:
    assert verify(out) == []
    assert sample_checksums(out) == sample_checksums(reference)
    statuses = {name: line["status"] for name, line in final_status(out).items()}
    assert statuses == {name: line["status"] for name, line in final_status(reference).items()}
    assert len(statuses) == len(find_inputs(sources))
    assert not list(out.glob(".task-*"))  # no staging folder left behind


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_ray_pack_equals_a_single_machine_pack(tmp_path, ray_address, inputs, fmt):
    reference = tmp_path / "single"
    pack([inputs], reference, fmt=fmt)
    out = tmp_path / "out"
    summary = pack([inputs], out, fmt=fmt, ray=ray_address)
    assert_same_dataset(out, reference, [inputs])
    lines = report(out)
    assert len(lines) == len({line["path"] for line in lines}) == len(find_inputs([inputs]))  # each once
    for name, word in BAD_INPUTS.items():
        line = final_status(out)[f"z-bad/{name}"]
        assert line["status"] == "failed" and word in line["reason"]
    assert (summary["ok"], summary["failed"]) == (len(sample_checksums(reference)), len(BAD_INPUTS))
    entries = load_manifest(out)["shards" if fmt == "wds" else "arrays"]
    assert len(entries) > 1  # spread over several tasks
    again = pack([inputs], out, fmt=fmt, ray=ray_address)  # a re-run packs nothing twice
    assert (again["ok"], again["skipped"]) == (0, summary["ok"])
    assert sample_checksums(out) == sample_checksums(reference)


def test_a_bad_volume_inside_a_task_is_reported_and_the_task_goes_on(tmp_path, ray_address, inputs):
    import ray

    good = sorted((inputs / "a").iterdir())
    bad = inputs / "z-bad" / "text.nii"
    jobs = [(good[0], "first", {}), (bad, "bad", {}), (good[1], "second", {"status": "normal"})]
    options = {"spacing": None, "modality": "auto", "dtype": "int16", "foreground_crop": False,
               "repair_nonfinite": False, "atlas": None}
    layout = {"fmt": "wds", "codec": "zstd", "shard_size": 1e9, "chunk": 64}
    result = ray.get(pack_task.remote("task-test", str(tmp_path), jobs, options, layout))
    assert [status for status, _ in result["outcomes"]] == ["ok", "failed", "ok"]
    assert "cannot read" in result["outcomes"][1][1]
    [entry] = result["entries"]
    assert entry["keys"] == ["first", "second"] and (tmp_path / entry["path"]).is_file()
    assert not (tmp_path / ".task-test.tmp").exists()


def test_on_error_fail_stops_the_run_naming_the_input(tmp_path, ray_address, inputs):
    out = tmp_path / "out"
    with pytest.raises(VolumeError, match="z-bad") as caught:
        pack([inputs], out, ray=ray_address, on_error="fail")
    assert "stopped: --on-error fail" in str(caught.value)
    assert verify(out) == [] and not list(out.glob(".task-*"))


def test_a_task_no_node_can_hold_is_refused(tmp_path, ray_address, inputs):
    for options, word in (({"ray_cpus_per_task": 3}, "CPUs"), ({"ray_memory_per_task": 10**15}, "memory")):
        with pytest.raises(ConfigError, match=f"no node of the Ray cluster has .*{word}"):
            pack([inputs], tmp_path / "out", ray=ray_address, **options)


def test_a_killed_task_is_retried_and_the_dataset_verifies(tmp_path, ray_address, with_big):
    sources, reference = with_big
    out = tmp_path / "out"
    outcome: dict = {}

    def driver():
        try:
            outcome["summary"] = pack(sources, out, ray=ray_address)
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=driver)
    thread.start()
    try:
        [victim, *_] = wait_for(running_pack_tasks, 120, "a running pack task")
        victim.kill()  # SIGKILL: the worker is lost mid-task
    finally:
        thread.join(300)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["failed"] == len(BAD_INPUTS)  # only the bad inputs: the lost task was redone
    assert_same_dataset(out, reference, sources)


def test_a_task_that_keeps_raising_reports_each_of_its_inputs(tmp_path, ray_address, inputs):
    reference = tmp_path / "single"
    pack([inputs], reference, fmt="zarr")
    victim = sorted((inputs / "c").iterdir())[0]
    out = tmp_path / "out"
    (out / "volumes.zarr").mkdir(parents=True)
    (out / "volumes.zarr" / unique_key(victim, set())).write_text("")  # its array can never be renamed here
    summary = pack([inputs], out, fmt="zarr", ray=ray_address)
    final = final_status(out)
    assert len(final) == len(report(out)) == len(find_inputs([inputs]))  # every input, once
    lost = {name for name, line in final.items() if "pack task failed" in line["reason"]}
    assert f"c/{victim.name}" in lost
    assert f"after {TASK_RETRIES + 1} attempts" in final[f"c/{victim.name}"]["reason"]
    assert summary["failed"] == len(lost) + len(BAD_INPUTS)
    assert verify(out) == []
    packed = sample_checksums(out)
    assert len(packed) == summary["ok"] and packed.items() <= sample_checksums(reference).items()
    assert not list(out.glob(".task-*"))


def test_a_killed_driver_resumes_to_the_same_dataset(tmp_path, ray_address, with_big):
    sources, reference = with_big
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # the sslmed under test, wherever it is
        [str(Path(sslmed.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "sslmed", "pack", *map(str, sources), "--out", str(out),
               "--ray", ray_address]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "manifest.json").is_file() and load_manifest(out)["samples"] > 0, 180,
                 "the driver's first finished task")
    finally:
        driver.kill()
        driver.wait()
    done = load_manifest(out)["samples"]
    assert done < len(sample_checksums(reference))  # killed mid-way: the slow last input is not in
    # Ray stops a dead driver's tasks; let them go before resuming (a real rerun starts seconds later)
    wait_for(lambda: not running_pack_tasks(), 60, "the dead driver's tasks to stop")
    summary = pack(sources, out, ray=ray_address)
    assert summary["skipped"] == done  # what the killed driver finished is kept, not redone
    assert_same_dataset(out, reference, sources)
