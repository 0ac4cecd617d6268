"""`pack --part I/N` + `merge` give the dataset of one single-machine pack; content checksums; what the
split and the Ray driver refuse before doing any work (no Ray cluster is started in this module)."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from packing_inputs import BAD_INPUTS, final_status, report, write_mixed_inputs

from sslmed.cli import main
from sslmed.io.manifest import load_manifest, sample_checksums, verify
from sslmed.io.pack import pack
from sslmed.io.pack_ray import TASK_VOLUMES, plan_tasks
from sslmed.io.parts import balanced_ranges
from sslmed.io.readers import find_inputs
from sslmed.lock import DirectoryLock


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_mixed_inputs(tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, inputs):
    """The reference: every input packed on this machine, per format."""
    root = tmp_path_factory.mktemp("single")
    for fmt in ("wds", "zarr"):
        pack([inputs], root / fmt, fmt=fmt, shard_size=20e3)
    return {fmt: root / fmt for fmt in ("wds", "zarr")}


def keys_in_order(out) -> list[str]:
    manifest = load_manifest(out)
    if manifest["format"] == "wds":
        return [key for entry in manifest["shards"] for key in entry["keys"]]
    return [entry["key"] for entry in manifest["arrays"]]


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_parts_merged_equal_a_single_machine_pack(tmp_path, inputs, single, fmt, capsys):
    out = tmp_path / "out"
    for index in range(3):
        assert main(["pack", str(inputs), "--out", str(out), "--format", fmt, "--part", f"{index}/3"]) == 0
    assert main(["merge", str(out)]) == 0
    assert "3 parts" in capsys.readouterr().out
    assert verify(out) == []
    assert sample_checksums(out) == sample_checksums(single[fmt])
    assert keys_in_order(out) == keys_in_order(single[fmt])  # contiguous parts keep the input order
    assert len({key.split("_")[0] for key in keys_in_order(out)}) < len(keys_in_order(out))  # x and x_1
    lines = report(out)
    assert len(lines) == len({line["path"] for line in lines}) == len(find_inputs([inputs]))
    for name, word in BAD_INPUTS.items():
        assert word in final_status(out)[f"z-bad/{name}"]["reason"]
    # run again (e.g. the job was requeued): the same dataset
    assert main(["merge", str(out)]) == 0
    assert verify(out) == [] and sample_checksums(out) == sample_checksums(single[fmt])


def test_a_resumed_part_keeps_its_keys_and_reports_each_input_once_after_merge(tmp_path, inputs, single):
    out = tmp_path / "out"
    for index in range(2):
        pack([inputs], out, part=(index, 2), shard_size=20e3)
    packed = {line["path"] for line in report(out / "parts" / "1") if line["status"] == "ok"}
    pack([inputs], out, part=(1, 2), shard_size=20e3)  # a requeued array job: everything already packed
    skipped = {line["path"] for line in report(out / "parts" / "1") if line["reason"] == "already packed"}
    assert skipped == packed
    main(["merge", str(out)])
    assert sample_checksums(out) == sample_checksums(single["wds"])
    assert len(report(out)) == len(find_inputs([inputs]))


def test_merge_names_missing_unfinished_and_foreign_parts(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(out)]) == 2
    assert "no parts to merge" in capsys.readouterr().err
    pack([inputs], out, part=(0, 4))
    pack([inputs], out, part=(2, 4))
    assert main(["merge", str(out)]) == 2
    assert "part(s) 1, 3 of 4 missing" in capsys.readouterr().err
    # the last part holds the bad inputs (last in input order): under --on-error fail it stops unfinished
    assert main(["pack", str(inputs), "--out", str(out), "--part", "3/4", "--on-error", "fail"]) == 2
    assert load_manifest(out / "parts" / "3")["part"]["complete"] is False
    pack([inputs], out, part=(1, 4))
    assert main(["merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "part(s) 3 unfinished" in err and "of 4 missing" not in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()
    # a part of another split of the inputs
    other = tmp_path / "other"
    pack([inputs], other, part=(0, 2))
    pack([inputs], other, part=(1, 3))
    assert main(["merge", str(other)]) == 2
    assert "part(s) 1 belong to another split" in capsys.readouterr().err


def test_merge_refuses_overlapping_parts(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    for index in range(2):
        pack([inputs], out, part=(index, 2))
    path = out / "parts" / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"].append(load_manifest(out / "parts" / "0")["shards"][0])  # part 0's first shard
    path.write_text(json.dumps(manifest))
    assert main(["merge", str(out)]) == 2
    assert "parts 0 and 1 both hold key" in capsys.readouterr().err


def test_merge_refuses_a_directory_holding_a_dataset(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    pack([inputs], out)
    pack([inputs], out, part=(0, 1))
    assert main(["merge", str(out)]) == 2
    assert "not a merge of parts" in capsys.readouterr().err


def test_each_part_and_the_merge_hold_their_own_directory(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    with DirectoryLock(out / "parts" / "0", "another sslmed pack"):
        pack([inputs], out, part=(1, 2))  # another part packs beside a running one
        assert main(["pack", str(inputs), "--out", str(out), "--part", "0/2"]) == 2
        assert f"{out / 'parts' / '0'} is in use" in capsys.readouterr().err
    pack([inputs], out, part=(0, 2))
    with DirectoryLock(out, "another sslmed merge"):
        assert main(["merge", str(out)]) == 2
        assert f"{out} is in use" in capsys.readouterr().err
    assert main(["merge", str(out)]) == 0


def test_a_part_cut_from_another_input_list_is_refused_on_resume(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    pack([inputs / "a"], out, part=(0, 2))
    assert main(["pack", str(inputs), "--out", str(out), "--part", "0/2"]) == 2
    assert "of another input list" in capsys.readouterr().err


def test_verify_checks_each_sample_content_checksum(tmp_path, single):
    for fmt in ("wds", "zarr"):
        copy = tmp_path / fmt
        shutil.copytree(single[fmt], copy)
        manifest = load_manifest(copy)
        entry = manifest["shards"][0] if fmt == "wds" else manifest["arrays"][0]
        if fmt == "wds":
            entry["content_sha256"][0] = "0" * 64
        else:
            entry["content_sha256"] = "0" * 64
        (copy / "manifest.json").write_text(json.dumps(manifest))
        problems = verify(copy)
        assert len(problems) == 1 and "content checksum differs" in problems[0], problems


def test_balanced_ranges_cover_every_input_once_with_about_equal_bytes():
    sizes = [5, 100, 3, 3, 50, 0, 0, 70, 20, 1]
    for count in (1, 2, 3, 7, 12):
        ranges = balanced_ranges(sizes, count)
        assert len(ranges) == count
        assert [i for r in ranges for i in r] == list(range(len(sizes)))
        share = (sum(sizes) + len(sizes)) / count
        assert all(sum(sizes[i] + 1 for i in r) <= share + max(sizes) + 1 for r in ranges)


def test_ray_tasks_cover_every_input_once_within_their_limits():
    sizes = [10**6] * 1000 + [5 * 10**9] * 10
    for slots in (1, 4, 64):
        tasks = plan_tasks(sizes, slots)
        assert [i for t in tasks for i in t] == list(range(len(sizes)))
        assert all(len(t) <= TASK_VOLUMES for t in tasks)
        assert len(tasks) >= min(len(sizes), 4 * slots) * 0.5  # enough tasks to keep every worker busy


def test_cluster_options_are_checked_before_any_work(tmp_path, inputs, capsys):
    import ray

    assert not ray.is_initialized(), "an earlier test module left its Ray session running"
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cases = {("--ray", f"127.0.0.1:{port}"): "cannot reach the Ray cluster",
             ("--ray", "nowhere"): "must be local, auto or HOST:PORT",
             ("--ray", "local", "--workers", "2"): "with --ray use --ray-cpus-per-task",
             ("--ray", "local", "--ray-cpus-per-task", "0"): "must be positive"}
    for extra, message in cases.items():
        assert main(["pack", str(inputs), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main(["pack", str(inputs), "--out", str(tmp_path / "o"), "--part", "3/3"])
    assert "not a part" in capsys.readouterr().err
