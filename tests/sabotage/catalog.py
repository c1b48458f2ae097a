"""The sabotage catalog: each entry breaks one claim of the project in one small edit, and names the
tests that must catch it. Anchors are exact strings that must occur once in the file; when the code
moves, the entry is STALE and must be updated with it (the runner fails on stale entries)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sabotage:
    name: str
    claim: str  # what the broken code violates
    file: str
    anchor: str
    replacement: str
    tests: tuple[str, ...]


SABOTAGES: list[Sabotage] = [
    Sabotage(
        name="packer_drops_a_sample",
        claim="every sample is packed exactly once",
        file="mmtrain/packing/policy.py",
        anchor="            packs.append(ids[p].tolist())",
        replacement="            packs.append(ids[p].tolist()[1:] or ids[p].tolist())",
        tests=("tests/unit/packing/test_algorithms.py",),
    ),
    Sabotage(
        name="cu_seqlens_off_by_one",
        claim="cu_seqlens keep samples apart at their exact boundaries",
        file="mmtrain/steps/batch.py",
        anchor="            bounds.append(offset + used)",
        replacement="            bounds.append(offset + used + (1 if len(bounds) == 1 and used > 1 else 0))",
        tests=("tests/unit/steps/test_batch.py",),
    ),
    Sabotage(
        name="vit_erf_gelu_for_quick_gelu",
        claim="the ViT uses CLIP's QuickGELU (LLaVA parity with transformers)",
        file="mmtrain/models/vlm.py",
        anchor='    "quick_gelu": quick_gelu,',
        replacement='    "quick_gelu": F.gelu,',
        tests=("tests/integration/test_hf_models.py::test_logits_losses_and_vit_equal_transformers",),
    ),
    Sabotage(
        name="vit_final_ln_on_patch_tokens",
        claim="no final LayerNorm on the patch features (transformers applies it to the pooled CLS only)",
        file="mmtrain/models/vision.py",
        anchor="        if self.apply_post_layernorm:",
        replacement="        if True:",
        tests=("tests/integration/test_hf_models.py::test_logits_losses_and_vit_equal_transformers",),
    ),
    Sabotage(
        name="vit_feature_layer_ignored",
        claim="the projector sees vision_feature_layer's hidden state, not the last block's",
        file="mmtrain/models/vision.py",
        anchor="        y = self.hidden_states(pixels, self.layers_used)",
        replacement="        y = self.hidden_states(pixels, len(self.blocks.layers))",
        tests=("tests/integration/test_hf_models.py::test_logits_losses_and_vit_equal_transformers",),
    ),
    Sabotage(
        name="cls_kept_in_features",
        claim="vision_feature_select_strategy=default drops the CLS from the features",
        file="mmtrain/models/vision.py",
        anchor='        self.drop_first = v.feature_select_strategy == "default"',
        replacement="        self.drop_first = False",
        tests=("tests/integration/test_hf_models.py::test_logits_losses_and_vit_equal_transformers",),
    ),
    Sabotage(
        name="sliding_window_off_by_one",
        claim="sliding-window attention has transformers' semantics (window keys, the query included)",
        file="mmtrain/models/attention/reference.py",
        anchor="                mask |= torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-window)",
        replacement="                mask |= torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-window - 1)",
        tests=("tests/unit/models/test_sliding_window.py",),
    ),
    Sabotage(
        name="rope_theta_truncated",
        claim="a float rope theta is used as it is (int() truncated it)",
        file="mmtrain/models/vlm.py",
        anchor="        self.rope_theta = float(cfg.decoder.rotary_base)",
        replacement="        self.rope_theta = int(cfg.decoder.rotary_base)",
        tests=("tests/integration/test_hf_models.py::test_logits_losses_and_vit_equal_transformers",),
    ),
    Sabotage(
        name="padded_vocab_in_softmax",
        claim="vocab rows padded for TP take no probability mass (losses equal the checkpoint's)",
        file="mmtrain/models/vlm.py",
        anchor="        if self.padded_vocab_size == self.vocab_size:",
        replacement="        if True:",
        tests=("tests/integration/test_hf_models.py::test_logits_losses_and_vit_equal_transformers",),
    ),
    Sabotage(
        name="qkv_groups_not_interleaved",
        claim="q/k/v are fused in megatron's per-group layout",
        file="mmtrain/models/hf/common.py",
        anchor="            torch.cat(parts, dim=1, out=dst.view(g, per + 2 * d, *rest))",
        replacement="            torch.cat([parts[1], parts[0], parts[2]], dim=1, out=dst.view(g, per + 2 * d, *rest))",
        tests=("tests/unit/models/test_hf_config.py", "tests/integration/test_hf_models.py::test_logits_losses_and_vit_equal_transformers"),
    ),
    Sabotage(
        name="init_keyed_by_stage_local_layer",
        claim="initial weights are drawn by global layer index: one seed, one model at every TP/PP",
        file="mmtrain/models/params.py",
        anchor='        return f"language_model.decoder.layers.{int(m.group(1)) + layer_offset}." + local[m.end() :]',
        replacement='        return f"language_model.decoder.layers.{int(m.group(1))}." + local[m.end() :]',
        tests=("tests/integration/test_hf_models.py::test_one_seed_gives_one_model_at_every_layout",),
    ),
    Sabotage(
        name="export_swaps_gate_and_up",
        claim="export writes every tensor back bit-exact",
        file="mmtrain/models/hf/common.py",
        anchor="        return {self.gate: gate.contiguous(), self.up: up.contiguous()}",
        replacement="        return {self.gate: up.contiguous(), self.up: gate.contiguous()}",
        tests=("tests/integration/test_hf_models.py::test_import_then_export_is_bit_exact",),
    ),
    Sabotage(
        name="no_final_checkpoint",
        claim="a run ends with a checkpoint by default (trainer.save_final)",
        file="mmtrain/train/loop.py",
        anchor="        if (t.save_final or t.save_interval > 0) and t.max_steps > start:",
        replacement="        if t.save_interval > 0 and t.max_steps > start:",
        tests=("tests/integration/test_hf_models.py::test_a_run_ends_with_a_checkpoint_that_exports",),
    ),
    Sabotage(
        name="step_lines_miss_train_log",
        claim="step lines go to stdout and to <output_dir>/train.log",
        file="mmtrain/train/log.py",
        anchor="        for h in (self.console, self.file):",
        replacement="        for h in (self.console,):",
        tests=("tests/unit/train/test_log.py",),
    ),
    Sabotage(
        name="tensorboard_step_off_by_one",
        claim="TensorBoard steps count like the log lines (step 1 = the first optimizer step)",
        file="mmtrain/train/log.py",
        anchor="                self.tb.add_scalar(tag, v, global_step=done)",
        replacement="                self.tb.add_scalar(tag, v, global_step=done - 1)",
        tests=("tests/unit/train/test_log.py",),
    ),
    Sabotage(
        name="compare_padding_from_the_wrong_run",
        claim="every number of the compare table is that run's own summary value",
        file="mmtrain/compare.py",
        anchor='            "padding_fraction": summary.get("padding_fraction"),',
        replacement='            "padding_fraction": unpacked.get("padding_fraction"),',
        tests=("tests/unit/test_compare.py",),
    ),
    Sabotage(
        name="analyze_not_training_lengths",
        claim="mmtrain analyze on the training config reports the lengths training packs",
        file="mmtrain/analysis/training.py",
        anchor="    image = tiles * tpt\n",
        replacement="    image = tiles * (tpt + 1)\n",
        tests=("tests/unit/analysis/test_training_view.py",),
    ),
    Sabotage(
        name="run_plot_without_its_series",
        claim="mmtrain plot draws the run's metrics, not empty axes",
        file="mmtrain/analysis/plot.py",
        anchor='    ax.plot(xs, ys, color="tab:blue", linewidth=1.2, label="loss per step", **_marker(len(xs)))',
        replacement="    pass",
        tests=("tests/unit/analysis/test_plot.py",),
    ),
    Sabotage(
        name="noisy_start_up",
        claim="tool commands print at most three warning lines",
        file="mmtrain/quiet.py",
        anchor='    if os.environ.get("MMTRAIN_SHOW_WARNINGS", "") not in ("", "0"):',
        replacement="    if True:",
        tests=("tests/unit/test_quiet.py",),
    ),
    Sabotage(
        name="import_cycle",
        claim="no import cycles inside mmtrain/ (function-level imports included)",
        file="mmtrain/data/config.py",
        anchor="from dataclasses import dataclass\n",
        replacement="from dataclasses import dataclass\n\n\ndef _root():\n    from mmtrain.config import MMTrainConfig\n\n    return MMTrainConfig\n",
        tests=("tests/unit/test_layering.py",),
    ),
]
