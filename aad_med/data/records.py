"""Plain records describing where a cohort's files are: what discovery produces and every later
stage consumes. No file is read here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aad_med import CHANNELS


@dataclass(frozen=True)
class ImageSource:
    """One image on disk: a 3D file, or one volume of a 4D file (Decathlon layout).

    Args:
        path: the NIfTI file.
        volume: index along the fourth axis for a 4D file; ``None`` for a 3D file.
    """

    path: Path
    volume: int | None = None


@dataclass(frozen=True)
class SubjectRecord:
    """The files of one subject, keyed by canonical channel name (``t1, t1ce, t2, flair``)."""

    subject_id: str
    images: dict[str, ImageSource]
    seg: ImageSource | None = None

    def as_dict(self) -> dict:
        """Primitive-only form, used as MONAI data dict (stable to hash and pickle)."""
        out: dict = {"subject_id": self.subject_id}
        for ch in CHANNELS:
            src = self.images[ch]
            out[ch] = str(src.path)
            out[f"{ch}_volume"] = -1 if src.volume is None else int(src.volume)
        out["seg"] = "" if self.seg is None else str(self.seg.path)
        out["seg_volume"] = -1 if self.seg is None or self.seg.volume is None else self.seg.volume
        return out

    @classmethod
    def from_dict(cls, d: dict) -> SubjectRecord:
        """Inverse of :meth:`as_dict`."""

        def src(key: str) -> ImageSource:
            vol = int(d.get(f"{key}_volume", -1))
            return ImageSource(Path(d[key]), None if vol < 0 else vol)

        images = {ch: src(ch) for ch in CHANNELS}
        seg = src("seg") if d.get("seg") else None
        return cls(str(d["subject_id"]), images, seg)

    @property
    def files(self) -> list[Path]:
        """Distinct files of this subject (images and segmentation)."""
        paths = [s.path for s in self.images.values()]
        if self.seg is not None:
            paths.append(self.seg.path)
        return list(dict.fromkeys(paths))


@dataclass
class Cohort:
    """A discovered cohort: its folder (or CSV), layout name and subjects sorted by ID.

    ``skipped`` holds one line per subject left out by ``skip_invalid`` validation.
    """

    path: Path
    layout: str
    subjects: list[SubjectRecord]
    skipped: list[str] = field(default_factory=list)

    @property
    def subject_ids(self) -> list[str]:
        return [s.subject_id for s in self.subjects]

    @property
    def n_with_seg(self) -> int:
        return sum(s.seg is not None for s in self.subjects)
