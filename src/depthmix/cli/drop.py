"""depthmix drop: a smaller model with its least important blocks removed, saved as a plain Hugging Face checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..flags import at_least

METHOD = "mod"  # the method whose retrofit baseline this command makes (tests/test_method_homes.py)

DESCRIPTION = """Removes whole blocks from a causal LM, chosen by ShortGPT's block influence (the blocks that turn
their input least, measured on calibration text; block 0 always stays), and saves the result as a plain Hugging
Face checkpoint with its tokenizer: AutoModelForCausalLM.from_pretrained loads it without depthmix. This is the
static baseline every MoD retrofit has to beat at the same FLOPs. Dropping only attention sub-layers cannot be
saved this way: transformers has no per-layer "no attention" setting for Llama-like models (layer_types only
chooses among kinds of attention), so that baseline exists only in the library, in memory
(depthmix.tuners.mod.importance.drop_attention)."""


def register(sub) -> None:
    p = sub.add_parser("drop", help="remove the least important blocks of a model; save a plain HF checkpoint",
                       description=DESCRIPTION)
    p.add_argument("--model", default="smollm2-135m", help="an embedded model name, a model folder or a Hub id")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--blocks", type=at_least(1), help="how many blocks to drop: the least influential ones")
    which.add_argument("--layers", help="which blocks to drop, e.g. 3,5,7 (no influence measured)")
    p.add_argument("--task", default="lm/wikitext-2", help="text task whose train split calibrates the influence")
    p.add_argument("--data-dir", help="local data folder (else $DEPTHMIX_DATA)")
    p.add_argument("--calib-blocks", type=at_least(1), default=8, help="calibration sequences")
    p.add_argument("--calib-len", type=at_least(2), default=256, help="tokens per calibration sequence")
    p.add_argument("--output-dir", required=True, help="new folder for the checkpoint (refused if it exists and is "
                   "not empty); it also gets depthmix_drop.json (the dropped blocks and every block's influence)")
    p.set_defaults(func=run)


def parse_layers(text: str) -> list[int]:
    from ..config import ConfigError
    try:
        return sorted({int(x) for x in text.replace("[", "").replace("]", "").split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected block indices such as 3,5,7") from None


def run(args) -> int:
    from ..config import ConfigError
    from ..models import load_model, load_tokenizer
    from ..tuners.mod.importance import block_influence, drop_blocks, least_important
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--output-dir {out}: exists and is not an empty folder")
    layers = parse_layers(args.layers) if args.layers else None
    model = load_model(args.model).eval()
    tok = load_tokenizer(args.model)
    record = {"model": args.model}
    if layers is None:
        from ..bench.mod import text_blocks
        calib = text_blocks(args.task, "train", tok, args.calib_len, args.data_dir, limit=args.calib_blocks)
        if len(calib) == 0:
            raise ConfigError(f"--task {args.task}: no calibration sequence of {args.calib_len} tokens in its text")
        scores = block_influence(model, calib)
        layers = least_important(scores, args.blocks)
        record.update(influence=[round(s, 6) for s in scores], calibration=f"{len(calib)} x {args.calib_len} tokens "
                      f"of {args.task} train")
    total = model.config.num_hidden_layers
    drop_blocks(model, layers)
    record.update(dropped=layers, blocks_before=total, blocks_after=model.config.num_hidden_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:  # written whole, then moved into place: a failure leaves no half checkpoint
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "depthmix_drop.json").write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"dropped blocks {layers} of {total}: {out} (AutoModelForCausalLM.from_pretrained loads it)")
    return 0
