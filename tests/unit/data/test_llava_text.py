"""LLaVA JSON samples as the model's own tokenizer, chat template and image processor make them
(tests/hf_chat.py folders): token ids, answer targets and pixels equal transformers'
`processor.apply_chat_template(..., return_assistant_tokens_mask=True)`; images stay where their
`<image>` stood; loss only on answers; templates without markers; bad records and oversize samples
named by record id; tiling with thumbnail and EXIF orientation; the eval plan covers every sample once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import hf_chat as C
from mmtrain.config import compose
from mmtrain.data.sources.llava_train import BadSampleError, LlavaJsonTrainSource
from mmtrain.steps.batch import build_micro_batch
from mmtrain.train.evaluate import eval_plan

TPT = 16  # tokens per 28 px tile of the tiny CLIP / SigLIP (tests/hf_models.py)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_text")
    data = C.write_dataset(root / "data")
    dirs = {fam: C.save_folder(fam, root / fam, seed=i) for i, fam in enumerate(("mistral_clip", "llama_siglip"))}
    return {"root": root, "data": data, "dirs": dirs}


def _source(world, family, *extra):
    cfg = compose(["model=hf", f"model.pretrained={world['dirs'][family]}", "data=llava_json",
                   f"data.source={world['data']}", "packing.seq_length=400", *extra])
    return LlavaJsonTrainSource(cfg, TPT)


@pytest.mark.parametrize("family", ["mistral_clip", "llama_siglip"])
def test_samples_are_transformers_ids_targets_and_pixels(world, family):
    """String contents (BOS from the template) and list-of-parts contents (BOS from the tokenizer,
    the processor's rule): ids, answer mask and pixel values equal the processor's."""
    from transformers import AutoProcessor

    src = _source(world, family)
    proc = AutoProcessor.from_pretrained(str(world["dirs"][family]))
    assert src.ids == C.record_ids()
    for i, rec in enumerate(C.RECORDS):
        s = src.sample(i, with_pixels=True)
        seq, is_image, is_target = s.stream()
        ref = C.encode_reference(proc, rec, C.FOLDERS[family][1], world["root"] / "data")
        assert seq.tolist() == ref["input_ids"].tolist(), src.ids[i]
        assert is_target.tolist() == (ref["assistant_mask"].numpy() == 1).tolist(), src.ids[i]
        assert not (is_image & is_target).any()
        if ref["pixel_values"] is None:
            assert s.tiles == 0 and s.pixels.shape[0] == 0
        else:
            assert np.array_equal(s.pixels, ref["pixel_values"].numpy()), src.ids[i]


def test_llava_hf_template_that_puts_images_first_equals_transformers(world, tmp_path):
    """A template may place images itself (llava-hf: a message's images, then its text): whatever it
    renders, the tokens, targets and pixels are the processor's."""
    from transformers import AutoProcessor

    tpl = tmp_path / "llava_hf.jinja"
    tpl.write_text(C.LLAVA_HF_TEMPLATE)
    src = _source(world, "llama_siglip", f"data.chat_template={tpl}")
    assert src.encoder.form == "parts"
    proc = AutoProcessor.from_pretrained(str(world["dirs"]["llama_siglip"]))
    for i, rec in enumerate(C.RECORDS):
        s = src.sample(i, with_pixels=True)
        seq, _, is_target = s.stream()
        ref = C.encode_reference(proc, rec, "parts", world["root"] / "data", chat_template=C.LLAVA_HF_TEMPLATE)
        assert seq.tolist() == ref["input_ids"].tolist(), src.ids[i]
        assert is_target.tolist() == (ref["assistant_mask"].numpy() == 1).tolist(), src.ids[i]


def test_a_tokenizer_with_another_image_token_gets_it_where_image_stood(world, tmp_path):
    """data.tokenizer= a tokenizer whose image token is `<img>`: the records' `<image>` become it."""
    from transformers import AutoProcessor

    tok = C.make_tokenizer(C.STRING_TEMPLATE, False, image_token="<img>")
    tok.save_pretrained(str(tmp_path / "tok"))
    src = _source(world, "mistral_clip", f"data.tokenizer={tmp_path / 'tok'}")
    assert src.encoder.image_token == "<img>" and src.encoder.image_id == C.IMAGE_ID
    proc = AutoProcessor.from_pretrained(str(world["dirs"]["mistral_clip"]))
    for i, rec in enumerate(C.RECORDS):  # same vocabulary but for the image token's spelling
        ref = C.encode_reference(proc, rec, "string", world["root"] / "data")
        assert src.sample(i, with_pixels=False).stream()[0].tolist() == ref["input_ids"].tolist(), src.ids[i]


def test_image_tokens_stay_where_the_placeholder_stood_and_loss_is_on_answers_only(world):
    src = _source(world, "mistral_clip")
    tok = src.encoder.tok
    s = src.sample(src.ids.index("middle"), with_pixels=False)
    seq, is_image, _ = s.stream()
    first = int(np.flatnonzero(is_image)[0])
    assert tok.decode(seq[:first]) == "<s>USER: Look at this photo: "
    assert is_image.sum() == TPT and is_image[first : first + TPT].all()
    mb = build_micro_batch([[s]], row_length=None, tokens_per_tile=TPT, image_shape=(3, 28, 28), capacity=400)
    m = mb.loss_mask.numpy().astype(bool)
    assert tok.decode(mb.labels.numpy()[m]) == "Mostly blue.</s>Tall and thin.</s>"  # answers, nothing of the user's
    assert not np.isin(mb.image_token_index.numpy(), np.flatnonzero(m) + 1).any()  # no image token is a target
    s2 = src.sample(src.ids.index("two_images"), with_pixels=True)
    seq2, img2, _ = s2.stream()
    runs = np.flatnonzero(np.diff(np.r_[0, img2.astype(int)]) == 1)
    assert len(runs) == 2 and tok.decode(seq2[runs[0] + TPT : runs[1]]) == " or "
    assert s2.pixels.shape == (2, 3, 28, 28)


def test_loss_on_all_targets_every_text_token(world):
    s = _source(world, "mistral_clip", "data.loss_on=all").sample(1, with_pixels=False)
    _, is_image, is_target = s.stream()
    assert (is_target == ~is_image).all()


def test_template_without_markers_finds_answers_by_prefixes(world, tmp_path):
    tpl = tmp_path / "nomark.jinja"
    tpl.write_text(C.STRING_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
                   + "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}")
    src = _source(world, "mistral_clip", f"data.chat_template={tpl}")
    assert not src.encoder.has_markers
    s = src.sample(src.ids.index("middle"), with_pixels=False)
    seq, _, is_target = s.stream()
    assert src.encoder.tok.decode(seq[is_target]) == "Mostly blue.</s>\nTall and thin.</s>\n"


def test_byte_tokenizer_and_builtin_templates(world):
    cfg = compose(["model=tiny", "data=llava_json", f"data.source={world['data']}", "data.chat_template=chatml",
                   "packing.seq_length=4000"])
    src = LlavaJsonTrainSource(cfg, TPT)
    s = src.sample(src.ids.index("text_only"), with_pixels=False)
    assert s.text.max() < 256 and src.images.name == "tiles"
    assert bytes(s.text.tolist()).decode() == (
        "<|im_start|>user\nTell me a fact.<|im_end|>\n<|im_start|>assistant\nThe cat sat on the mat.<|im_end|>\n")
    assert bytes(s.text[s.targets].tolist()).decode() == "The cat sat on the mat.<|im_end|>"


BAD = [
    ("str_conv", {"id": "str_conv", "conversations": "hello"}, "`conversations` is a string, not a list"),
    ("no_conv", {"id": "no_conv", "image": "wide.png"}, "it has no `conversations`"),
    ("bad_turn", {"id": "bad_turn", "conversations": ["hi"]}, "turn 0 is a string, not an object"),
    ("bad_role", {"id": "bad_role", "conversations": [{"from": "bot", "value": "x"}]}, "`from` is 'bot'"),
    ("list_value", {"id": "list_value", "conversations": [{"from": "human", "value": ["x"]}]}, "turn 0: `value` is a list"),
    ("num_image", {"id": "num_image", "image": 3, "conversations": C._turns(("human", "<image>"), ("gpt", "x"))}, "`image` is a number"),
    ("two_ph", {"id": "two_ph", "image": "wide.png", "conversations": C._turns(("human", "<image><image>"), ("gpt", "x"))},
     "2 `<image>` placeholders for 1 image"),
    ("no_answer", {"id": "no_answer", "conversations": C._turns(("human", "hi"),)}, "no `gpt` answer to learn from"),
    ("no_file", {"id": "no_file", "image": "nope.png", "conversations": C._turns(("human", "<image>"), ("gpt", "x"))}, "missing_image"),
]


def _bad_dataset(world, tmp_path):
    good = [json.dumps(r) for r in C.RECORDS[:3]]
    lines = good + [json.dumps(r) for _, r, _ in BAD] + ['{"id": "broken", ']
    path = world["root"] / "data" / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fail_policy_lists_every_bad_record_with_what_is_wrong(world, tmp_path):
    path = _bad_dataset(world, tmp_path)
    with pytest.raises(BadSampleError) as e:
        _source(world, "mistral_clip", f"data.source={path}")
    msg = str(e.value)
    assert f"{len(BAD) + 1} bad records" in msg
    for sid, _, why in BAD:
        assert f"sample {sid!r}" in msg and why in msg, (sid, msg)
    assert "bad.jsonl:13" in msg and "unreadable JSON" in msg  # no id: file:line
    assert "data.bad_sample_policy=skip" in msg


def test_skip_policy_reports_every_bad_record_by_id(world, tmp_path):
    path = _bad_dataset(world, tmp_path)
    src = _source(world, "mistral_clip", f"data.source={path}", "data.bad_sample_policy=skip")
    assert src.ids == C.record_ids()[:3]
    report = {e["id"]: e for e in src.report.entries}
    assert set(report) == {sid for sid, _, _ in BAD} | {"bad.jsonl:13"}
    assert all(e["action"] == "skipped" for e in report.values())
    assert "`conversations` is a string, not a list" in report["str_conv"]["reason"]
    assert src.data_counts()["skipped_samples"] == len(BAD) + 1
    out = tmp_path / "data_report.jsonl"
    src.report.write(out)
    assert len(out.read_text().splitlines()) == len(BAD) + 1


def test_oversize_error_names_the_records_and_the_seq_length_that_fits(world):
    with pytest.raises(BadSampleError) as e:
        _source(world, "mistral_clip", "packing.seq_length=90")
    msg = str(e.value)
    assert "'middle' (105 tokens)" in msg and "'second_turn' (101 tokens)" in msg and "'two_images'" not in msg
    assert "raise packing.seq_length (>= 105" in msg and "oversize_policy=truncate" in msg


def test_oversize_drop_and_truncate_report_and_never_cut_an_answer(world):
    src = _source(world, "mistral_clip", "packing.seq_length=90", "packing.oversize_policy=drop")
    assert "middle" not in src.ids and "second_turn" not in src.ids
    assert {(e["id"], e["action"]) for e in src.report.entries} == {("middle", "dropped"), ("second_turn", "dropped")}
    src = _source(world, "mistral_clip", "packing.seq_length=90", "packing.oversize_policy=truncate")
    tok = src.encoder.tok
    i = src.ids.index("middle")  # the first answer ends at token 70 <= 90: kept whole, the second left out
    s = src.sample(i, with_pixels=False)
    seq, _, tgt = s.stream()
    assert len(seq) == 70 and len(seq) == s.length == src.tiles[i] * TPT + src.text_tokens[i]
    assert tok.decode(seq[tgt]) == "Mostly blue.</s>"
    j = src.ids.index("second_turn")  # its first answer ends before the image: kept, image dropped
    s = src.sample(j, with_pixels=True)
    assert s.tiles == 0 and s.pixels.shape[0] == 0
    assert tok.decode(s.stream()[0][s.stream()[2]]) == "How can I help you today?</s>"
    entries = {e["id"]: e for e in src.report.entries}
    assert entries["middle"]["action"] == "truncated" and "1 of 2 answers whole" in entries["middle"]["reason"]
    src = _source(world, "mistral_clip", "packing.seq_length=50", "packing.oversize_policy=truncate")
    assert {e["id"]: e["action"] for e in src.report.entries}["first"] == "dropped"  # its only answer does not fit


def test_tiles_thumbnail_and_exif_orientation(tmp_path):
    from PIL import Image

    arr = np.zeros((30, 120, 3), np.uint8)  # stored 120 wide, 30 high: top half white, bottom half black
    arr[:15] = 255
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: upright 30 wide, 120 high, left black, right white
    im.save(tmp_path / "rot.jpg", exif=exif)
    rec = {"id": "r", "image": "rot.jpg", "conversations": C._turns(("human", "<image>"), ("gpt", "a"))}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    base = ["model=tiny", "data=llava_json", f"data.source={tmp_path / 'd.jsonl'}", "data.max_tiles=6", "packing.seq_length=400"]
    src = LlavaJsonTrainSource(compose(base), TPT)
    assert src.images.acct.grid(*src.sizes[0][0]) == (1, 4)  # the upright grid: one column, four rows
    s = src.sample(0, with_pixels=True)
    assert s.tiles == 4 and s.pixels.shape == (4, 3, 28, 28)
    left, right = s.pixels[:, :, :, :10].mean(), s.pixels[:, :, :, -10:].mean()
    assert right > left + 2  # the pixels are upright too
    src = LlavaJsonTrainSource(compose(base + ["data.thumbnail=true"]), TPT)
    s = src.sample(0, with_pixels=True)
    assert s.tiles == 5 and s.pixels.shape == (5, 3, 28, 28) and s.image_tokens == 5 * TPT


def test_processor_that_disagrees_with_the_model_is_refused(world, tmp_path):
    import shutil

    from transformers import CLIPImageProcessor

    d = tmp_path / "m"
    shutil.copytree(world["dirs"]["mistral_clip"], d)
    CLIPImageProcessor(size={"shortest_edge": 35}, crop_size={"height": 35, "width": 35}).save_pretrained(str(d))
    (d / "processor_config.json").unlink()
    with pytest.raises(ValueError, match="makes 3x35x35 inputs, the vision encoder takes 3x28x28"):
        _source({**world, "dirs": {"mistral_clip": d}}, "mistral_clip")


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("dp,mbs", [(1, 1), (2, 1), (3, 2), (4, 3)])
def test_eval_plan_scores_every_sample_exactly_once(dp, mbs, packing):
    rng = np.random.default_rng(dp)
    lengths = rng.integers(5, 120, 37)
    tiles = rng.integers(0, 3, 37)
    plan = eval_plan(lengths, tiles, dp=dp, packing=packing, seq_length=128, micro_batch_size=mbs)
    assert len(plan) == dp
    seen = [i for rank in plan for mb in rank for row in mb for i in row]
    assert sorted(seen) == list(range(37))
    for rank in plan:
        rows = [row for mb in rank for row in mb]
        assert all(len(mb) <= mbs for mb in rank)
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)  # source order within a rank
        assert all(int(lengths[row].sum()) <= 128 for row in rows)
        if not packing:
            assert all(len(row) == 1 for row in rows)
    if packing:
        assert len(seen) > sum(len(rank) for rank in plan)  # several samples share a row
