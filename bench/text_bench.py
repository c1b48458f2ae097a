"""What real text and images cost the data path, against transformers' own processor, in one process.

Builds the tiny LLaVA folder of the tests (trained byte-level BPE tokenizer, chat template with
generation markers, LlavaProcessor with a CLIP image processor at 28 px), writes N LLaVA records
(2-6 turns of 10-60 words, one image each among 16 PNGs of 64-512 px), then times:

* opening the training source (`LlavaJsonTrainSource`: every record checked and encoded with
  answer targets, image headers read) against the baseline, transformers'
  `processor.apply_chat_template(..., tokenize=True, return_assistant_tokens_mask=True)` over the
  same conversations (text only: what opening needs);
* one sample with pixels (`sample(i, with_pixels=True)`) against `processor.apply_chat_template`
  with the image (the same work: render, tokenise, expand, load and process the image).

Each measurement is repeated (`--repeats`, interleaved with its baseline) and the medians are
printed as one JSON line.

    python bench/text_bench.py [--records 2000] [--samples 200] [--repeats 5] [--out /tmp/text_bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

TESTS = Path(__file__).resolve().parent.parent / "tests"


def _tests_helper(name: str):
    """A helper module of tests/ (the tiny HF model folders), loaded from its file under its own
    name so that its sibling imports (`import hf_models`) resolve to the same modules."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod

WORDS = ("the cat sat on a mat what is in this picture red blue wall photo describe it tall thin "
         "which colour larger first second image hello there how can I help you today").split()


def write_records(root: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(16):
        w, h = int(rng.integers(64, 512)), int(rng.integers(64, 512))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{k}.png")
    lines = []
    for i in range(n):
        turns = []
        for t in range(int(rng.integers(1, 4))):
            q = " ".join(rng.choice(WORDS, int(rng.integers(10, 60))))
            a = " ".join(rng.choice(WORDS, int(rng.integers(10, 60))))
            turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
        lines.append(json.dumps({"id": f"r{i}", "image": f"img{i % 16}.png", "conversations": turns}))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=200, help="samples timed with pixels")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="/tmp/text_bench")
    args = ap.parse_args()
    _tests_helper("hf_models")
    C = _tests_helper("hf_chat")
    from PIL import Image
    from transformers import AutoProcessor

    from mmtrain.config import compose
    from mmtrain.data.sources.llava_train import LlavaJsonTrainSource

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = C.save_folder("mistral_clip", root / "model")
    data = write_records(root, args.records)
    records = [json.loads(x) for x in data.read_text().splitlines()]
    proc = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    convs = [[{"role": C.ROLE[t["from"]], "content": t["value"]} for t in r["conversations"]] for r in records]

    cfg = compose(["model=hf", f"model.pretrained={model_dir}", "data=llava_json", f"data.source={data}",
                   "packing.seq_length=4096"])
    LlavaJsonTrainSource(cfg, 16)  # warm: tokenizer / processor loading is not what is timed
    k = min(args.samples, len(records))
    times: dict[str, list[float]] = {"open": [], "base_open": [], "sample": [], "base_sample": []}
    for _ in range(args.repeats):  # interleaved, medians: the box is shared
        t0 = time.perf_counter()
        src = LlavaJsonTrainSource(cfg, 16)
        times["open"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for m in convs:
            proc.tokenizer.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        times["base_open"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(k):
            src.sample(i, with_pixels=True)
        times["sample"].append((time.perf_counter() - t0) / k)
        t0 = time.perf_counter()
        for i in range(k):
            proc.apply_chat_template(convs[i], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                     processor_kwargs={"images": [Image.open(root / records[i]["image"])]})
        times["base_sample"].append((time.perf_counter() - t0) / k)
    med = {key: float(np.median(v)) for key, v in times.items()}
    ours_open, base_open, ours_sample, base_sample = med["open"], med["base_open"], med["sample"], med["base_sample"]
    print(json.dumps({
        "records": len(records), "mean_decoder_tokens": float(np.mean(src.tiles * 16 + src.text_tokens)),
        "open_s": round(ours_open, 3), "baseline_apply_chat_template_s": round(base_open, 3),
        "open_vs_baseline": round(ours_open / base_open, 2),
        "sample_with_pixels_ms": round(1000 * ours_sample, 3), "baseline_processor_ms": round(1000 * base_sample, 3),
        "sample_vs_baseline": round(ours_sample / base_sample, 2),
    }))


if __name__ == "__main__":
    main()
