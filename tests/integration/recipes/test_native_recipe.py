"""The native-resolution recipe (recipe=qwen25vl7b_native_h100x8_tp2pp1dp4): it composes to a Qwen2.5-VL-7B-shaped
model on the native LLaVA-Pretrain length table at full scale and to its CPU smoke scale; the smoke
run trains, and `mmtrain simulate` with the same overrides predicts the steps training ran (same
samples, same per-rank costs, ViT per image included)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmtrain.config import compose

REPO = Path(__file__).resolve().parents[3]
SMOKE = ["recipe=qwen25vl7b_native_h100x8_tp2pp1dp4", "scale=smoke"]


def test_full_scale():
    cfg = compose(["recipe=qwen25vl7b_native_h100x8_tp2pp1dp4"])
    m = cfg.model
    assert m.name == "qwen2_5_vl_7b" and m.vision.type == "native" and m.decoder.mrope_section == [16, 24, 24]
    assert (m.decoder.num_layers, m.decoder.hidden_size, m.vision.num_layers, m.vision.hidden_size) == (28, 3584, 32, 1280)
    assert m.vision.fullatt_block_indexes == [7, 15, 23, 31] and m.freeze_vit
    assert cfg.cluster.name == "h100" and cfg.cluster.nodes * cfg.cluster.procs_per_node == 8
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.trainer.global_batch_size == 16
    assert (cfg.packing.seq_length, cfg.packing.max_vision_patches_per_pack) == (8192, 24576)
    assert cfg.data.name == "lengths" and cfg.data.source.endswith("llava_pretrain_native_10k.csv")
    assert cfg.trainer.precision == "bf16"


def test_the_table_is_the_design_notes_distribution():
    """576..20,880 patches at 14 px (ceil), 99.4% in 500-1500, the 0.03% tail >= 3000; what a
    Qwen2.5-VL processor makes of it fits a full-scale pack alone."""
    from mmtrain.data.lengths import load_length_table

    rows = list(csv.DictReader((REPO / "tests/assets/llava_pretrain_native_10k.csv").open()))
    p = np.array([int(r["patches_p14"]) for r in rows])
    assert (p.min(), p.max()) == (576, 20_880) and np.mean((p >= 500) & (p <= 1500)) == pytest.approx(0.994)
    assert 1 <= (p >= 3000).sum() <= 5
    t = load_length_table(str(REPO / "tests/assets/llava_pretrain_native_10k.csv"), 1)
    assert int(t.lengths.max()) <= 8192 and 4 * int(t.image_tokens.max()) <= 24576


def test_cpu_smoke_scale():
    cfg = compose(SMOKE)
    assert cfg.model.name == "tiny_native" and cfg.cluster.name == "cpu"
    assert cfg.trainer.max_steps <= 5 and cfg.trainer.precision == "fp32"
    assert (cfg.packing.seq_length, cfg.packing.max_vision_patches_per_pack) == (512, 1536)
    assert cfg.data.source.endswith("llava_pretrain_native_smoke.csv")


def test_smoke_run_is_what_simulate_predicts(tmp_path):
    from mmtrain.balancing.cost import CostModel, work_terms
    from mmtrain.steps.from_config import build_source
    from mmtrain.steps.simulate import run_steps

    out = tmp_path / "run"
    ovr = SMOKE + ["trainer.max_steps=3", "trainer.log_sample_ids=true", "trainer.progress_bar=off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", *ovr, f"trainer.output_dir={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(np.isfinite(m["loss"]) for m in metrics)
    cfg = compose(ovr)
    steps, stream = run_steps(cfg, dp=1, steps=3)
    src = build_source(cfg, 1)
    cm = CostModel.from_config(cfg.model)
    for m, st in zip(metrics, steps, strict=True):
        assert m["rank_sample_ids"][0] == [src.ids[i] for i in st.rank_samples(0)]
        assert m["predicted_rank_cost"] == pytest.approx(st.predicted_rank_cost, rel=1e-12)
        ids = st.sample_ids
        want = work_terms(stream.lengths[ids], [src.vision_lengths[i] for i in ids]) @ cm.coefficients
        assert m["predicted_rank_cost"][0] == pytest.approx(float(want.sum()), rel=1e-9)
