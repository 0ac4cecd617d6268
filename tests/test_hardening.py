"""Hostile or damaged inputs on shared machines: nothing a file says is executed, nothing is lost
without a word."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_support import TinyMethod, ToyLoader, tiny_config

from sslmed.cli import main
from sslmed.config import Config, load_config
from sslmed.data.pipeline import build_loader
from sslmed.data.sources import SkipCounter, open_dataset, open_shard_url
from sslmed.errors import CheckpointError, DataError, SslmedError
from sslmed.io.manifest import verify
from sslmed.io.pack import pack
from sslmed.io.synthetic import write_phantoms
from sslmed.train import checkpoint as ckpt
from sslmed.train import engine as eng
from sslmed.train.loop import run_pretraining

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


class RunsCode:
    """Unpickling this runs `touch <path>`: what a crafted checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


# ---- shard names never reach a shell ------------------------------------------------------------


def test_a_shard_name_from_the_manifest_never_reaches_a_shell(packed_wds, tmp_path, capsys):
    marker = tmp_path / "injected"
    node = tmp_path / "node"
    node.mkdir()
    manifest = json.loads((packed_wds / "manifest.json").read_text())
    manifest["shards"][0]["path"] = f"shard-000000.tar; touch {marker}; cat /dev/null #"
    (node / "manifest.json").write_text(json.dumps(manifest))
    for url in (f"pipe:cat {packed_wds}/{{shard}}", f"pipe:cat {packed_wds}/{{shard}} | cat"):
        with pytest.raises(DataError, match=r"shards\[0\]\.path .*not a shard name"):
            open_dataset(node, url)
    assert main(["verify", str(node)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(DataError, match="not a shard name"):  # whoever calls the opener
        open_shard_url(f"pipe:cat {packed_wds}/{{shard}}", f"x; touch {marker}")
    assert not marker.exists()


@pytest.mark.parametrize("template", ["pipe:cat {dir}/{{shard}}",  # an argument list, no shell
                                      "pipe:cat {dir}/{{shard}} | cat"])  # a pipeline: shell, name quoted
def test_shard_urls_stream_with_and_without_a_shell(packed_wds, tmp_path, template):
    node = tmp_path / "node"
    node.mkdir()
    shutil.copy(packed_wds / "manifest.json", node)
    dataset, skips = open_dataset(node, template.format(dir=packed_wds)), SkipCounter()
    seen = [s.key for unit in dataset.units for s in dataset.samples(unit, skips)]
    assert seen == open_dataset(packed_wds).keys
    assert skips.as_dict() == {"shards": 0, "samples": 0, "grid_points": 0}


# ---- checkpoints load without running code -----------------------------------------------------


def trained_run(run: Path, *overrides: str) -> ckpt.Checkpoint:
    cfg = tiny_config(run, "train.steps=2", "checkpoint.every=2", *overrides)
    run_pretraining(cfg, TinyMethod, ToyLoader)
    return ckpt.complete_checkpoints(run)[-1]


def plant(state_file: Path, marker: Path) -> None:
    state = torch.load(state_file, weights_only=False)
    state["payload"] = RunsCode(marker)
    torch.save(state, state_file)


def test_a_crafted_zero0_checkpoint_runs_no_code_on_resume_or_export(tmp_path, capsys):
    marker = tmp_path / "ran"
    latest = trained_run(tmp_path / "run")
    plant(latest.path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match=r"refused to load: .*GLOBAL posix.system"):
        run_pretraining(tiny_config(tmp_path / "run", "train.steps=4"), TinyMethod, ToyLoader)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "enc.safetensors")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "enc.safetensors").exists()
    # checkpoint.trust lifts the restriction, as documented (unsafe)
    eng.consolidated_state_dict(latest.path.parent, latest.tag, 0, trust=True)
    assert marker.exists()


def test_a_crafted_zero1_checkpoint_runs_no_code_on_export_or_universal_conversion(tmp_path):
    marker = tmp_path / "ran"
    latest = trained_run(tmp_path / "run", "train.zero_stage=1", "train.precision=bf16")
    # DeepSpeed's own states pass the allow-list: consolidation and re-slicing work as before
    whole = eng.consolidated_state_dict(latest.path.parent, latest.tag, 1)
    trained = {n for n, p in TinyMethod(tiny_config(tmp_path)).named_parameters() if p.requires_grad}
    assert trained <= set(whole)
    eng.to_universal(latest.path, tmp_path / "universal")
    assert any((tmp_path / "universal").rglob("fp32.pt"))
    # DeepSpeed's own tool finds the newest checkpoint through the `latest` tag file, without -t
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    convert_zero_checkpoint_to_fp32_state_dict(str(latest.path.parent), str(tmp_path / "fp32"))
    converted = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(converted[k], whole[k]) for k in trained)
    optim = next(latest.path.glob("*optim_states.pt"))
    plant(optim, marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        eng.consolidated_state_dict(latest.path.parent, latest.tag, 1)
    with pytest.raises(CheckpointError, match="refused to load"):
        eng.to_universal(latest.path, tmp_path / "universal-2")
    assert not marker.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))


# ---- one writer per directory -------------------------------------------------------------------

HOLD = """
import sys, time
from sslmed.lock import DirectoryLock
DirectoryLock(sys.argv[1], sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold_lock(directory: Path, command: str) -> subprocess.Popen:
    """Another process holding `directory`'s lock (it never releases: only killing it ends it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), command], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_pack_or_pretrain_into_a_held_directory_is_refused(phantom_files, tmp_path, capsys):
    out, run = tmp_path / "out", tmp_path / "run"
    holders = [hold_lock(out, "sslmed pack"), hold_lock(run, "sslmed pretrain")]
    try:
        assert main(["pack", *map(str, phantom_files), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by sslmed pack (pid {holders[0].pid} on " in err
        assert not (out / "manifest.json").exists()
        with pytest.raises(SslmedError, match=f"in use by sslmed pretrain \\(pid {holders[1].pid} "):
            trained_run(run)
        assert not (run / "checkpoints").exists()
    finally:
        for holder in holders:
            holder.kill()  # kill -9: the kernel drops the lock, the file stays behind, stale
            holder.wait()
    assert main(["pack", *map(str, phantom_files), "--out", str(out)]) == 0
    assert f"taking over the stale lock of sslmed pack (pid {holders[0].pid}" in capsys.readouterr().err
    assert trained_run(run).step == 2


def test_a_run_dir_that_cannot_be_written_is_a_one_line_error(packed_wds, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = main(["pretrain", "mae-tiny", f"data.path={packed_wds}", f"run.dir={tmp_path / 'file' / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot create run.dir" in err


# ---- checkpoints of other runs, damaged checkpoints ---------------------------------------------


def test_a_new_run_into_a_run_dir_with_checkpoints_is_refused(tmp_path):
    trained_run(tmp_path / "other")
    trained_run(tmp_path / "run")
    for choice in ("none", str(tmp_path / "other")):
        with pytest.raises(CheckpointError, match="already holds another run's checkpoints"):
            trained_run(tmp_path / "run", f"checkpoint.resume={choice}")
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path / "run")] == [2]
    fresh = trained_run(tmp_path / "fresh", "train.steps=3", f"checkpoint.resume={tmp_path / 'other'}")
    assert fresh.step == 3


def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    trained_run(run, "train.steps=4", "checkpoint.keep=2")
    newest = run / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a full disk
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "enc")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step_4: unreadable checkpoint" in err
    trained_run(run, "train.steps=6", "checkpoint.keep=2")
    out, err = capsys.readouterr()
    assert f"skipping checkpoint {run / 'checkpoints' / 'step_4'}:" in err
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in out
    assert [c.step for c in ckpt.complete_checkpoints(run)] == [4, 6]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---- pack: symlinks, workers --------------------------------------------------------------------


def test_symlink_loops_and_cycles_are_reported_and_the_walk_ends(phantom_files, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    shutil.copy(phantom_files[0], data / "sub" / "a.nii.gz")
    (data / "self.nii.gz").symlink_to("self.nii.gz")  # a link to itself
    (data / "sub" / "up").symlink_to("..")  # a folder link back up: an endless walk if followed
    summary = pack([data], tmp_path / "out")
    report = [json.loads(line) for line in (tmp_path / "out" / "report.jsonl").read_text().splitlines()]
    reasons = {Path(r["path"]).name: (r["status"], r["reason"]) for r in report}
    assert summary["ok"] == 1 and summary["skipped"] == 2
    assert reasons["self.nii.gz"] == ("skipped", "symlink loop")
    assert reasons["up"][0] == "skipped" and "already walked" in reasons["up"][1]


def descendants(pid: int, depth: int | None = None) -> set[int]:
    """Every live process below `pid` (from /proc; zombies excluded), down to `depth` levels."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [(pid, 0)]
    while todo:
        parent, level = todo.pop()
        for child in children.get(parent, []) if depth is None or level < depth else []:
            found.add(child)
            todo.append((child, level + 1))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_pack_with_workers(inputs: list[Path], out: Path) -> tuple[subprocess.Popen, set[int]]:
    """`sslmed pack --workers 2` in a process of its own, once its forkserver and workers are up."""
    cmd = [sys.executable, "-m", "sslmed", "pack", *map(str, inputs), "--out", str(out), "--workers", "2",
           "--spacing", "0.5", "0.5", "0.5"]  # upsampling keeps the workers busy
    parent = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(pack_workers(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    return parent, descendants(parent.pid)


def pack_workers(pid: int) -> set[int]:
    """The worker processes of a pack: the children of its forkserver."""
    servers = [p for p in descendants(pid, depth=1) if b"forkserver" in read_cmdline(p)]
    return descendants(servers[0]) if servers else set()


def read_cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_gone(pids: set[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


@pytest.mark.slow
def test_a_dead_worker_is_a_one_line_error_and_a_killed_pack_leaves_no_workers(tmp_path):
    inputs = write_phantoms(tmp_path / "in", 4, shape=(64, 64, 64), seed=1)
    parent, started = start_pack_with_workers(inputs, tmp_path / "a")
    try:
        workers = pack_workers(parent.pid)
        assert len(workers) >= 2, "pack never started its workers"
        os.kill(max(workers), signal.SIGKILL)  # as the kernel's OOM killer would
        err = parent.communicate(timeout=60)[1]
    finally:
        parent.kill()
    assert parent.returncode == 2
    assert err.splitlines()[-1].startswith("sslmed: error: a worker process died while reading ")
    assert "Traceback" not in err and not wait_gone(started, 10)

    parent, started = start_pack_with_workers(inputs, tmp_path / "b")
    parent.kill()  # kill -9 of pack itself
    parent.wait()
    assert len(pack_workers(parent.pid) | started) >= 3 and not wait_gone(started, 10)


# ---- streams checked against the manifest -------------------------------------------------------


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, phantom_files) -> Path:
    """The three phantoms in one tar shard."""
    out = tmp_path_factory.mktemp("one-shard") / "wds"
    pack(phantom_files, out)
    return out


def cut_after_first_sample(src: Path, dst: Path) -> Path:
    """A copy of `src` whose shard ends exactly where its second sample's first member begins."""
    shutil.copytree(src, dst)
    shard = dst / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    second = next(m for m in members if m.name.split(".")[0] != members[0].name.split(".")[0])
    with open(shard, "r+b") as handle:
        handle.truncate(second.offset)  # a member boundary: tar reads this as a valid, shorter shard
    return dst


@pytest.mark.parametrize("streamed", [False, True])
def test_a_shard_cut_at_a_member_boundary_is_counted_and_fatal_under_strict(one_shard, tmp_path, streamed):
    cut = cut_after_first_sample(one_shard, tmp_path / "cut")
    url = f"pipe:cat {cut}/{{shard}}" if streamed else ""
    dataset, skips = open_dataset(cut, url), SkipCounter()
    assert [s.key for s in dataset.samples(dataset.units[0], skips)] == dataset.keys[:1]
    assert skips.as_dict() == {"shards": 0, "samples": 2, "grid_points": 0}
    with pytest.raises(DataError, match="ends after 1 of the 3 samples the manifest lists"):
        list(dataset.samples(dataset.units[0], SkipCounter(strict=True)))


def test_a_nan_scale_fails_verify_and_is_skipped_by_the_stream(one_shard, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(one_shard, bad)
    shard = bad / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        meta = next(m for m in tar.getmembers() if m.name.endswith(".meta.json"))
        text = tar.extractfile(meta).read()
    scale = json.loads(text)["scale"]
    patched = text.replace(json.dumps(scale).encode(), b"NaN".ljust(len(json.dumps(scale))))
    assert len(patched) == len(text) and patched != text
    data = bytearray(shard.read_bytes())
    data[meta.offset_data:meta.offset_data + len(text)] = patched
    shard.write_bytes(bytes(data))
    problems = verify(bad)
    assert any("metadata scale is nan" in p for p in problems), problems
    dataset, skips = open_dataset(bad), SkipCounter()
    assert len(list(dataset.samples(dataset.units[0], skips))) == 2 and skips.samples == 1


def test_inspect_and_verify_errors_are_one_line(one_shard, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(one_shard, broken)
    (broken / "shard-000000.tar").unlink()
    manifest = json.loads((one_shard / "manifest.json").read_text())
    del manifest["shards"][0]["sha256"]
    (tmp_path / "typed").mkdir()
    (tmp_path / "typed" / "manifest.json").write_text(json.dumps({**manifest, "samples": "3"}))
    (tmp_path / "nosum").mkdir()
    (tmp_path / "nosum" / "manifest.json").write_text(json.dumps(manifest))
    cases = [(["inspect", str(broken)], "unreadable shard"),
             (["verify", str(tmp_path / "typed")], "samples is '3'"),
             (["verify", str(tmp_path / "nosum")], "shards[0] has no 'sha256'")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sslmed: error: ") and message in err, err


# ---- decompression bombs ------------------------------------------------------------------------

BOMB_READ = """
import resource, sys
from sslmed.errors import VolumeError
from sslmed.io.readers import read_volume
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_volume(sys.argv[1])
except VolumeError as exc:
    print(exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MiB
"""


def test_a_nifti_that_expands_beyond_its_header_is_refused_within_bounded_memory(tmp_path):
    import nibabel as nib

    header = nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)).to_bytes()  # 4 KB of data
    bomb = tmp_path / "bomb.nii.gz"
    deflate = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    with open(bomb, "wb") as handle:
        handle.write(deflate.compress(header))
        zeros = bytes(1 << 24)
        for _ in range(16):  # 256 MiB of trailing zeros in about a quarter of a megabyte
            handle.write(deflate.compress(zeros))
        handle.write(deflate.flush())
    assert bomb.stat().st_size < 1 << 20
    done = subprocess.run([sys.executable, "-c", BOMB_READ, str(bomb)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    message, grown_mib = done.stdout.strip().splitlines()
    assert "decompresses beyond" in message
    assert int(grown_mib) < 64  # the whole stream would be 256 MiB


def test_a_shard_member_that_expands_beyond_its_metadata_is_never_decoded(one_shard, tmp_path):
    from numcodecs import blosc

    bomb = tmp_path / "bomb"
    shutil.copytree(one_shard, bomb)
    shard = bomb / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = {m.name: (m, tar.extractfile(m).read()) for m in tar.getmembers()}
    key = next(iter(members)).split(".")[0]
    huge = np.zeros((512, 512, 256), np.int16)  # 128 MiB that compresses to a few kB
    buffer = io.BytesIO()
    np.save(buffer, huge)
    info = members[f"{key}.vol.blosc"][0]
    members[info.name] = (info, blosc.compress(buffer.getvalue(), b"zstd", 5))
    with tarfile.open(shard, "w") as tar:
        for info, data in members.values():
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dataset, skips = open_dataset(bomb), SkipCounter()
    loaded = [s.key for s in dataset.samples(dataset.units[0], skips)]
    assert key not in loaded and len(loaded) == 2 and skips.samples == 1
    assert any(f"sample '{key}': blosc buffer decompresses to" in p for p in verify(bomb))


# ---- Zarr: damaged chunks are caught while training ---------------------------------------------


def zarr_stream_config(path: Path, strict: bool) -> Config:
    cfg = Config()
    cfg.data.path, cfg.data.crop_size, cfg.data.workers, cfg.data.strict = str(path), 24, 0, strict
    cfg.data.crops_per_volume, cfg.data.shuffle_buffer, cfg.train.micro_batch = 1, 1, 1
    return cfg  # 24³ crops of 24×20×16 phantoms: every chunk of a volume is read


@pytest.fixture(scope="module")
def small_chunks(tmp_path_factory, phantom_files) -> Path:
    out = tmp_path_factory.mktemp("zarr") / "zarr"
    pack(phantom_files, out, fmt="zarr", chunk=4)  # 4³ chunks, several shard files per volume
    return out


def test_a_flipped_byte_in_a_zarr_chunk_is_caught_by_the_stream(small_chunks, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_chunks, bad)
    key = open_dataset(bad).keys[0]
    shard = next(p for p in sorted((bad / "volumes.zarr" / key / "c").rglob("*")) if p.is_file())
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # inside the first chunk's compressed bytes
    shard.write_bytes(bytes(data))
    assert any(p.startswith(f"volumes.zarr/{key}: checksum mismatch") for p in verify(bad))
    with pytest.raises(ValueError, match="checksum"):
        open_dataset(bad).read(key)
    loader = build_loader(zarr_stream_config(bad, strict=False), 0, 1)
    keys = [next(loader)["key"][0] for _ in range(4)]
    assert key not in keys and loader.skipped["samples"] >= 1
    with pytest.raises(DataError, match=f"corrupt sample {key}: cannot read: .*checksum"):
        strict = build_loader(zarr_stream_config(bad, strict=True), 0, 1)
        for _ in range(4):
            next(strict)


def test_a_deleted_zarr_shard_file_is_caught_by_the_stream(small_chunks, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(small_chunks, bad)
    key = open_dataset(bad).keys[0]
    next(p for p in sorted((bad / "volumes.zarr" / key / "c").rglob("*")) if p.is_file()).unlink()
    dataset, skips = open_dataset(bad), SkipCounter()
    assert list(dataset.samples(key, skips)) == [] and skips.samples == 1
    with pytest.raises(DataError, match="file\\(s\\) the manifest lists are missing"):
        list(dataset.samples(key, SkipCounter(strict=True)))


# ---- config values read as people mean them ----------------------------------------------------


def test_config_values_are_read_as_written(tmp_path, capsys):
    cfg = load_config("mae-tiny", ["optim.lr=1e-4", "run.dir=0755", "data.path=on", "train.steps=10"])
    assert (cfg.optim.lr, cfg.run.dir, cfg.data.path, cfg.train.steps) == (1e-4, "0755", "on", 10)
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 3e-4\nrun:\n  dir: 0750\ndata:\n  path: off\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert (cfg.optim.lr, cfg.run.dir, cfg.data.path) == (3e-4, "0750", "off")
    for override, message in [("optim.lr=-1e-3", "optim.lr must be positive"),
                              ("optim.lr=.nan", "'optim.lr' expects float"),
                              ("train.compile=on", "'train.compile' expects bool")]:
        assert main(["pretrain", "mae-tiny", override]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# ---- logs that go to a file --------------------------------------------------------------------


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSLMED_PROGRESS_SECONDS", "0")  # a line for every step
    trained_run(tmp_path / "run")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("pretrain: ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"] and "loss=" in lines[-1]
