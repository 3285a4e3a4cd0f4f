"""Dataset readers and the registry the harness looks them up in.

Four benchmarks read from disk (CUB-200-2011, Cars196, Stanford Online Products, In-Shop) and one
is generated offline (glyphs). The harness never downloads anything: each spec's `layout` and
`download_hint` tell the user what to put where.
"""

from __future__ import annotations

from pathlib import Path

from harness.datasets import cars, cub, glyphs, inshop, sop
from harness.datasets.base import DatasetSpec, Records
from harness.errors import DatasetError

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (
        # Validation interval and patience (in epochs of 100 iterations) are MLRC's.
        DatasetSpec("cub200", cub.load_cub, "mlrc", val_every_epochs=2, patience=9,
                    layout=cub.LAYOUT, download_hint=cub.DOWNLOAD_HINT),
        DatasetSpec("cars196", cars.load_cars, "mlrc", val_every_epochs=5, patience=14,
                    layout=cars.LAYOUT, download_hint=cars.DOWNLOAD_HINT),
        DatasetSpec("sop", sop.load_sop, "mlrc", val_every_epochs=20, patience=39,
                    layout=sop.LAYOUT, download_hint=sop.DOWNLOAD_HINT),
        # In-Shop is not in MLRC. Its train items (25,882 images, 3,997 classes) are SOP-like in
        # scale and classes-per-image, so SOP's schedule is used.
        DatasetSpec("inshop", inshop.load_inshop, "inshop", val_every_epochs=20, patience=39,
                    layout=inshop.LAYOUT, download_hint=inshop.DOWNLOAD_HINT),
        # ~3k training images: an epoch of 100 batches of 32 sees each about once, so
        # validating every epoch is cheap and a few epochs of patience suffice.
        DatasetSpec("glyphs", glyphs.load_glyphs, "mlrc", val_every_epochs=1, patience=5,
                    layout=glyphs.LAYOUT, download_hint=glyphs.DOWNLOAD_HINT),
    )
}


def get_dataset(name: str) -> DatasetSpec:
    """The registered dataset `name`; an unknown name is a DatasetError listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: "
                           f"{', '.join(DATASETS)}") from None


def load_records(name: str, root: Path | str, check_counts: bool = True, **options) -> Records:
    """Load dataset `name` from root. `options` go to the reader (the glyph generator's
    num_classes / per_class / image_size)."""
    return get_dataset(name).load(Path(root).expanduser(), check_counts=check_counts, **options)


__all__ = ["Records", "DatasetSpec", "DATASETS", "get_dataset", "load_records",
           "DatasetError"]
