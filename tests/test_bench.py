"""Benchmarks: the --quick paths run end to end and print their summary line; the pieces they compute
figures from (communication model, patch order, MONAI twin, result files) match independent references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sslmed.bench import common, scaling, step


def run_quick(argv: list[str], tmp_path: Path, capsys) -> dict[str, str]:
    """`sslmed bench ...` in this process; its last printed line."""
    from sslmed.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["bench", *argv, "--results", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # --quick pins one thread; leave the test process as it was
    return common.parse_summary(capsys.readouterr().out.strip().splitlines()[-1])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_step_quick(tmp_path, capsys):
    summary = run_quick(["step", "--quick", "--methods", "mae", "--checkpointing", "off"], tmp_path, capsys)
    assert float(summary["mae_samples_per_s"]) > 0
    assert float(summary["speedup_vs_monai"]) > 0
    assert 0 < float(summary["mfu"]) < 1.5
    rows = read_jsonl(tmp_path / "step.jsonl")
    assert {r["impl"] for r in rows} == {"sslmed", "monai"}
    for row in rows:
        assert row["status"] == "ok" and row["gflop_per_step"] > 0
        assert {"device", "cpu_model", "cores", "torch", "deepspeed", "date"} <= row["machine"].keys()


def test_residual_quick_times_both_targets(tmp_path, capsys):
    summary = run_quick(["residual", "--batch", "2", "--repeats", "1", "--warmup", "0"], tmp_path, capsys)
    assert float(summary["precomputed_step_s"]) > 0 and float(summary["target_s"]) > 0
    ratio = float(summary["on_the_fly_step_s"]) / float(summary["precomputed_step_s"])
    assert float(summary["on_the_fly_over_precomputed"]) == pytest.approx(ratio, rel=1e-3)
    (record,) = read_jsonl(tmp_path / "residual.jsonl")
    assert [r["targets"] for r in record["rows"]] == ["on_the_fly", "precomputed"] and record["kernel"] == 5


@pytest.mark.slow
def test_loader_small_run_compares_every_source(tmp_path, capsys):
    argv = ["loader", "--volumes", "2", "--shape", "32", "--crop", "16"]
    summary = run_quick(argv, tmp_path, capsys)
    [record] = read_jsonl(tmp_path / "loader.jsonl")
    sources = record["sources"]
    assert set(sources) == {"loadimage", "persistent", "sslmed-tar-none", "sslmed-tar-lz4", "sslmed-tar-zstd",
                            "sslmed-zarr-lz4", "sslmed-zarr-zstd"}
    assert all(row["crops"] == 2 * 4 for row in sources.values())  # every volume once, 4 crops each
    rates = {name: row["crops_per_s"] for name, row in sources.items()}
    best = summary["best"]
    assert best == max((k for k in rates if k.startswith("sslmed-")), key=rates.get)
    speedup = rates[best] / rates["persistent"]
    assert float(summary["speedup_vs_persistent"]) == pytest.approx(speedup, rel=1e-3)
    assert record["allocator"] == "sslmed"

    from sslmed.cli import main

    assert main(["bench", *argv, "--glibc-default", "--results", str(tmp_path)]) == 0
    again = read_jsonl(tmp_path / "loader.jsonl")[1]
    assert again["allocator"] == "glibc-default" and set(again["sources"]) == {"loadimage", "persistent"}


@pytest.mark.slow
def test_scaling_quick(tmp_path, capsys):
    summary = run_quick(["scaling", "--quick", "--steps", "1", "--warmup", "1"], tmp_path, capsys)
    assert float(summary["per_rank_samples_per_s_1"]) > 0 and float(summary["per_rank_samples_per_s_2"]) > 0
    assert float(summary["efficiency"]) > 0 and summary["engine"] == "deepspeed"
    assert int(summary["psi"]) == scaling.mae_parameter_count("base", 96)
    rows = read_jsonl(tmp_path / "scaling.jsonl")
    assert [r["ranks"] for r in rows] == [1, 2]
    assert sorted(r["rank"] for r in rows[1]["rank_results"]) == [0, 1]


def test_comm_volume_per_zero_stage():
    psi = 1_000_000
    for stage in (0, 1, 2):
        assert scaling.comm_elements_per_gpu(psi, stage, 2) == psi  # 2·(1/2)·Ψ
        assert scaling.comm_elements_per_gpu(psi, stage, 8) == pytest.approx(2 * 7 / 8 * psi)
    assert scaling.comm_elements_per_gpu(psi, 3, 64) == pytest.approx(3 * 63 / 64 * psi)
    assert scaling.comm_elements_per_gpu(psi, 2, 1) == 0
    row = next(r for r in scaling.projection(psi) if r["zero_stage"] == 3 and r["gpus"] == 64)
    assert row["link"] == "ib_ndr400"
    assert row["comm_ms"] == pytest.approx(3 * 63 / 64 * psi * 2 / (400e9 / 8) * 1e3)


def test_patchify_matches_a_strided_conv_token_order():
    x = torch.randn(2, 1, 8, 8, 8)
    patches = step.patchify(x, 4)  # (2, 8, 64)
    # Reference: a Conv3d whose output channel k copies voxel k of each patch emits the same tokens.
    conv = torch.nn.Conv3d(1, 64, kernel_size=4, stride=4, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(64).view(64, 1, 4, 4, 4))
        reference = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patches, reference)


def tiny_mae(args_extra: list[str] | None = None):
    args = step.parse_args(["--quick", "--methods", "mae", "--set", "model.dim=48", "--set", "model.depth=2",
                            "--set", "model.heads=2", *(args_extra or [])])
    cfg = step.bench_config(args, "mae", "tiny", 32, False)
    return step.build_sslmed(cfg), cfg


def test_monai_twin_has_the_same_blocks():
    method, cfg = tiny_mae()
    twin = step.monai_twin(method, cfg)

    def count(module):  # MONAI's blocks hold a cross-attention norm that self-attention never uses
        return sum(p.numel() for name, p in module.named_parameters() if "cross_attn" not in name)

    enc_blocks, dec_blocks = method.encoder().transformer.blocks, method.decoder.transformer.blocks
    assert len(twin.net.blocks) - 1 == len(enc_blocks)  # MONAI appends its final LayerNorm
    assert count(twin.net.blocks[0]) == count(enc_blocks[0])
    assert len(twin.net.decoder_blocks) - 1 == len(dec_blocks)
    assert count(twin.net.decoder_blocks[0]) == count(dec_blocks[0])
    assert twin.net.masking_ratio == cfg.method.mask_ratio


def test_monai_objective_is_mse_on_masked_patches():
    method, cfg = tiny_mae()
    twin = step.monai_twin(method, cfg)
    x = torch.randn(2, 1, 32, 32, 32)
    mask = torch.zeros(2, 8, dtype=torch.int)
    mask[:, :6] = 1  # MONAI marks hidden patches with 1
    twin.net.forward = lambda image: (torch.zeros(2, 8, 16**3), mask)
    loss, _ = twin({"image": x})
    target = step.patchify(x, 16)[:, :6]
    torch.testing.assert_close(loss, target.pow(2).mean())


def test_checkpointing_switch_keeps_monai_gradients():
    method, cfg = tiny_mae()
    twin = step.monai_twin(method, cfg)
    batch = step.synthetic_batch(2, 32, torch.device("cpu"))
    torch.manual_seed(0)
    twin(batch)[0].backward()
    plain = [p.grad.clone() for p in twin.parameters() if p.grad is not None]
    twin.zero_grad()
    step.set_checkpointing(twin, True)
    assert isinstance(twin.net.blocks[0], step.Recompute)
    torch.manual_seed(0)
    twin(batch)[0].backward()
    recomputed = [p.grad for p in twin.parameters() if p.grad is not None]
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b)
    step.set_checkpointing(twin, False)
    assert not isinstance(twin.net.blocks[0], step.Recompute)


def test_results_append_and_summary_round_trip(tmp_path):
    common.append_results("demo", [{"a": 1}], tmp_path)
    path = common.append_results("demo", [{"a": 2}, {"a": 3.5}], tmp_path)
    assert [r["a"] for r in read_jsonl(path)] == [1, 2, 3.5]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    line = common.summary_line({"x": 1.23456, "name": "cpu model", "none": None, "n": 3})
    assert common.parse_summary(line) == {"x": "1.235", "name": "cpu_model", "none": "nan", "n": "3"}
