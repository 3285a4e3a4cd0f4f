"""Write a small CUB-200-2011-layout data set of synthetic JPEGs (for GPU smoke runs and demos).

    python benchmarks/make_fake_cub.py OUT_DIR [--classes 40] [--per-class 20]

Then: python -m harness.run --study proxy_anchor_cub --data-root OUT_DIR \
          --set data.check_counts=false --set model.pretrained=false ...
The images carry no bird: the numbers mean nothing; the run proves the real-data path works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from harness.bench import synthetic_jpegs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    root = Path(args.out) / "CUB_200_2011"
    records = synthetic_jpegs(root / "images" / "all", args.classes, args.per_class)
    lines, labels = [], []
    for i, (path, label) in enumerate(zip(records.paths, records.labels), start=1):
        folder = root / "images" / f"{label + 1:03d}.Class_{label + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        path.rename(folder / path.name)
        lines.append(f"{i} {folder.name}/{path.name}")
        labels.append(f"{i} {label + 1}")
    (root / "images" / "all").rmdir()
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    print(f"wrote {len(lines)} images of {args.classes} classes under {root}")


if __name__ == "__main__":
    main()
