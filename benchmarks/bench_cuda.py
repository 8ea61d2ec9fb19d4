"""Rewrites on the real models, verified and timed on CUDA (onnxruntime-gpu, IO binding).

    python benchmarks/bench_cuda.py [--models-dir DIR] [--runs 200]

Prints a table: model, rule, exact, output error on CUDA, median latency original → rewritten, ratio.
Needs onnxruntime-gpu and a GPU; exits 2 with the install hint otherwise.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from convgraph import ConvGraphWarning, bench, verify
from convgraph.engine.rewrite import rewrite
from convgraph.errors import ConvGraphError

def page(size: int = 640) -> dict:
    """skimage's printed text page as PP-OCR det's input (ImageNet-normalized): random noise makes this
    detector hypersensitive (a 1e-7 input change moves its output by 0.3%), a real page does not."""
    import numpy as np
    from skimage import data, transform

    img = transform.resize(data.page(), (size, size), anti_aliasing=True)  # gray in [0, 1]
    rgb = np.repeat(img[None], 3, 0)
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    return {"x": ((rgb - mean) / std)[None].astype(np.float32)}


CASES = [  # model, input shapes, rule, params
    ("yolov8n", {"images": [1, 3, 640, 640]}, "separable", {"rank": "full"}),
    ("yolov8n", {"images": [1, 3, 640, 640]}, "separable", {"rank": "1"}),
    ("yolov8n", {"images": [1, 3, 640, 640]}, "spatial-separable", {"rank": "1"}),
    ("yolov8n", {"images": [1, 3, 640, 640]}, "low-rank", {"rank": "full"}),
    ("yolov8n", {"images": [1, 3, 640, 640]}, "low-rank", {"rank": "1/4"}),
    ("ppocr-det", {"x": [1, 3, 640, 640]}, "transpose-subpixel", {}),
    ("ppocr-det", {"x": [1, 3, 640, 640]}, "transpose-resize", {}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, help="folder with <name>.onnx (default: convgraph.zoo's cache)")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    warnings.simplefilter("ignore", ConvGraphWarning)
    rows = []
    for name, shapes, rule, params in CASES:
        if args.models_dir:
            path = args.models_dir / f"{name}.onnx"
        else:
            from convgraph.zoo import fetch
            path = fetch(name)
        res = rewrite(path, [rule], params=params, input_shapes=shapes, verify=False)
        feeds = page() if name == "ppocr-det" else None
        v = verify(path, res.model, inputs=feeds, input_shapes=shapes, provider="cuda")
        err = max(m.scaled_err for m in v.outputs.values())
        cos = min(m.cosine for m in v.outputs.values())
        b = bench([path, res.model], inputs=feeds, input_shapes=shapes, provider="cuda", runs=args.runs, warmup=20,
                  names=["original", "rewritten"])
        a, c = b.models
        exact = all(ch.exact for ch in res.report.changes)
        rows.append((name, f"{rule} {' '.join(f'{k}={v}' for k, v in params.items())}".strip(), len(res.report.changes),
                     "yes" if exact else "no", f"{err:.2e}", f"{cos:.5f}", f"{a.median_ms:.3f}", f"{c.median_ms:.3f}",
                     f"{b.ratios[0].median:.2f}"))
        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    head = ("model", "rule", "convs", "exact", "scaled err (CUDA)", "cosine", "orig ms", "rewritten ms", "speed ratio")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    print(f"\n{b.environment if hasattr(b, 'environment') else ''}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConvGraphError as e:
        print(f"bench_cuda: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
