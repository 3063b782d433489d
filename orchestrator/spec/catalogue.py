"""What a spec can name: methods, architectures and data sources, from distill_core's registries."""

from __future__ import annotations

from distill_core import __version__
from distill_core.data.sources import SOURCES
from distill_core.methods import METHODS
from distill_core.networks import ARCHITECTURES

CATALOGUE_KINDS = ("methods", "architectures", "sources")


def catalogue(kind: str) -> list[dict]:
    """One dict per registered entry of `kind`, with what a spec may set on it."""
    if kind == "methods":
        return [{"name": m.name, "summary": m.summary, "iterations": m.iterations, "lr_img": m.lr_img,
                 "init": m.init, "options": {k: repr(f.default) for k, f in m.options.model_fields.items()},
                 "needs_experts": m.needs_experts, "optimises_images": m.optimises_images,
                 "reference": m.reference} for m in sorted(METHODS.values(), key=lambda m: m.name)]
    if kind == "architectures":
        return [{"name": a.name, "options": sorted(a.options)} for a in ARCHITECTURES.values()]
    return [{"name": s.name, "channels": s.channels, "image_size": s.image_size, "num_classes": s.num_classes,
             "digits": s.digits} for s in SOURCES.values()]


def version() -> str:
    return __version__
