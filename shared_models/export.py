"""Export a checkpoint's encoders: DIR/image/ for timm, DIR/text/ for Hugging Face transformers."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

from shared_models.checkpoint import CheckpointError, load_checkpoint

IMAGE_DIR, TEXT_DIR = "image", "text"


def export(checkpoint_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write out_dir/image/{model.safetensors, config.json} and out_dir/text/ (save_pretrained model + tokenizer).

    Rebuild the image encoder with `timm.create_model(config["architecture"], **config["kwargs"])`; it
    takes one channel in [0, 1] normalised with mean 0.5 and std 0.5. CNN encoders also get
    `attention_pool.safetensors`, the pooling head that gives their global feature.
    """
    model, meta = load_checkpoint(checkpoint_dir)
    image_dir, text_dir = Path(out_dir) / IMAGE_DIR, Path(out_dir) / TEXT_DIR
    image_dir.mkdir(parents=True, exist_ok=True)

    encoder = model.image_encoder
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, image_dir / "model.safetensors")
    if encoder.attention_pool is not None:
        save_file(
            {k: v.contiguous() for k, v in encoder.attention_pool.state_dict().items()},
            image_dir / "attention_pool.safetensors",
        )
    config = {
        "architecture": encoder.timm_name,
        "kwargs": encoder.timm_kwargs,
        "input": {"channels": 1, "range": [0.0, 1.0], "mean": 0.5, "std": 0.5, "size": encoder.img_size},
        "source": {"checkpoint": str(checkpoint_dir), "step": meta.get("step"), "round": meta.get("round")},
    }
    (image_dir / "config.json").write_text(json.dumps(config, indent=2))

    model.text_encoder.model.save_pretrained(text_dir)
    model.tokenizer.save_pretrained(text_dir)
    return {"image": image_dir, "text": text_dir}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared_models.export", description=__doc__)
    parser.add_argument("checkpoint_dir", help="a checkpoint folder (model.safetensors, meta.json, tokenizer/)")
    parser.add_argument("--out", required=True, help="output folder; image/ and text/ are written inside")
    args = parser.parse_args(argv)
    try:
        paths = export(args.checkpoint_dir, args.out)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"image encoder -> {paths['image']}  (timm.create_model + load_state_dict)")
    print(f"text encoder  -> {paths['text']}  (AutoModel / AutoTokenizer.from_pretrained)")


if __name__ == "__main__":
    main()
