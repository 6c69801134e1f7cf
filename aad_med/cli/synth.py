"""``aad-synth``: write synthetic BraTS-style cohorts (thin entry point over
:mod:`aad_med.data.synthetic`).

Examples::

    aad-synth out/cohort --n-subjects 12 --site scanner_b
    aad-synth out/noisy --site reference --set noise=0.12 --set scale.t1ce=1.3
    aad-synth out/brats --brats-size --n-subjects 2 --layout brats2023
    aad-synth out/demo --preset demo      # train/, site_a/, site_a2/, site_b/
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from aad_med import CHANNELS, __version__
from aad_med.cli._errors import run_reporting_errors
from aad_med.data.synthetic import (
    BRATS_SHAPE,
    DEFAULT_SHAPE,
    LAYOUTS,
    SITES,
    SiteParams,
    check_output_folder,
    generate_cohort,
    get_site,
)
from aad_med.errors import ConfigError, InputError

PROG = "aad-synth"

DEMO_TRAIN_SITES: tuple[str, ...] = ("reference", "scanner_b", "population_b")
"""Sites mixed (subject by subject) in the demo's training cohort."""


def _parse_number_list(text: str, key: str) -> float | tuple[float, ...]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"--set {key}={text}: expected a number or comma-separated numbers"
        ) from None
    return values[0] if len(values) == 1 else values


def apply_settings(site: SiteParams, settings: Sequence[str]) -> SiteParams:
    """Apply ``key=value`` overrides to a site.

    ``scale``/``offset`` take one number, four comma-separated numbers (``t1,t1ce,t2,flair``)
    or one channel as ``scale.t1ce=1.3``; ``downsample`` one factor or three; ``skull_stripped``
    true/false; ``name`` a string; everything else one number.

    Raises:
        ConfigError: a malformed setting, an unknown key or an invalid value.
    """
    fields = {f.name for f in dataclasses.fields(SiteParams)}
    changes: dict = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise ConfigError(f"--set {item!r}: expected key=value")
        base, _, channel = key.partition(".")
        if base not in fields:
            raise ConfigError(
                f"--set {key}: unknown site parameter; known: {', '.join(sorted(fields))}"
            )
        if channel:
            if base not in ("scale", "offset"):
                raise ConfigError(
                    f"--set {key}: only scale and offset take a channel (scale.t1ce=...)"
                )
            if channel not in CHANNELS:
                raise ConfigError(
                    f"--set {key}: unknown channel {channel!r}; channels are {', '.join(CHANNELS)}"
                )
            current = list(changes.get(base, getattr(site, base)))
            number = _parse_number_list(text, key)
            if isinstance(number, tuple):
                raise ConfigError(f"--set {key}={text}: expected one number")
            current[CHANNELS.index(channel)] = number
            changes[base] = tuple(current)
        elif base == "name":
            changes[base] = text
        elif base == "skull_stripped":
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"--set {key}={text}: expected true or false")
            changes[base] = lowered in ("true", "1", "yes")
        else:
            value = _parse_number_list(text, key)
            if isinstance(value, tuple) and base not in ("scale", "offset", "downsample"):
                raise ConfigError(f"--set {key}={text}: expected one number")
            changes[base] = value
    if not changes:
        return site
    changes.setdefault("name", f"{site.name}+{'+'.join(item.split('=')[0] for item in settings)}")
    return site.with_updates(**changes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write synthetic BraTS-style cohorts (real NIfTI files) with controlled site shifts.",
        epilog=f"Sites: {', '.join(SITES)}. Site parameters for --set: "
        + ", ".join(f.name for f in dataclasses.fields(SiteParams)),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("out_dir", metavar="OUT_DIR", help="cohort folder to write (created)")
    p.add_argument("--n-subjects", type=int, default=8, help="subjects per cohort (default 8)")
    p.add_argument("--site", default="reference", help="named site (default reference)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override a site parameter (repeatable), e.g. noise=0.12, scale.t1ce=1.3")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="cohort seed: the anatomy (default 0)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                      help=f"volume size in voxels (default {' '.join(map(str, DEFAULT_SHAPE))})")  # fmt: skip
    size.add_argument("--brats-size", action="store_true",
                      help=f"real BraTS size {'x'.join(map(str, BRATS_SHAPE))} (slow: seconds per subject)")  # fmt: skip
    p.add_argument(
        "--layout", choices=LAYOUTS, default="brats2021", help="folder layout (default brats2021)"
    )
    p.add_argument(
        "--start-index", type=int, default=0, help="index of the first subject (default 0)"
    )
    p.add_argument("--id-prefix", default=None, help="replace the layout's subject-ID prefix")
    p.add_argument("--no-seg", action="store_true", help="do not write segmentations")
    p.add_argument("--preset", choices=("demo",), default=None,
                   help="demo: train/ (mixed sites, seed+1), site_a/ and site_a2/ (reference, different "
                   "subjects), site_b/ (shifted scanner and population, same anatomy as site_a)")  # fmt: skip
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a folder holding files aad-synth did not write, another site's cohort, "
        "or files of the same names (replaced)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    return p


def _describe(name: str, path: Path, n: int, site: str, seed: int, shape, layout: str) -> str:
    dims = "x".join(str(s) for s in shape)
    return f"{name}: {path} ({n} subject{'s' if n != 1 else ''}, site {site}, seed {seed}, {dims}, {layout})"


def write_demo(
    out_dir: Path, n_subjects: int, seed: int, shape, layout: str, with_seg: bool
) -> dict[str, Path]:
    """The demo's four cohorts under ``out_dir``; returns ``{name: folder}``.

    ``site_a`` and ``site_b`` share anatomy (same seed and indices), so they differ only by the
    site shift; ``site_a2`` holds other subjects of the reference site; ``train`` uses another
    seed and cycles subject by subject through :data:`DEMO_TRAIN_SITES`.
    """
    out = {}
    train = out_dir / "train"
    n_train = 2 * n_subjects
    for i in range(n_train):
        site = DEMO_TRAIN_SITES[i % len(DEMO_TRAIN_SITES)]
        generate_cohort(train, 1, site, seed + 1, shape, layout, with_seg=with_seg, start_index=i)
    out["train"] = train
    print(_describe("train", train, n_train, "+".join(DEMO_TRAIN_SITES), seed + 1, shape, layout))
    for name, site, start in (("site_a", "reference", 0), ("site_a2", "reference", n_subjects),
                              ("site_b", "site_b", 0)):  # fmt: skip
        path = generate_cohort(out_dir / name, n_subjects, site, seed, shape, layout,
                               with_seg=with_seg, start_index=start)  # fmt: skip
        out[name] = path
        print(_describe(name, path, n_subjects, site, seed, shape, layout))
    return out


def _run(args: argparse.Namespace) -> int:
    shape = BRATS_SHAPE if args.brats_size else tuple(args.shape or DEFAULT_SHAPE)
    out_dir = Path(args.out_dir)
    if args.preset == "demo":
        if args.settings or args.site != "reference":
            raise ConfigError("--preset demo uses its own sites; drop --site/--set")
        if not args.force and out_dir.is_dir() and any(out_dir.iterdir()):
            raise InputError(
                out_dir, "is not empty; the demo writes a fresh folder (or pass --force)"
            )
        write_demo(out_dir, args.n_subjects, args.seed, shape, args.layout, not args.no_seg)
        return 0
    site = apply_settings(get_site(args.site), args.settings)
    if not args.force:
        # Nothing is written before the whole cohort is known not to clobber or mix.
        first = args.start_index
        check_output_folder(
            out_dir,
            site,
            args.layout,
            range(first, first + max(args.n_subjects, 0)),
            args.id_prefix,
            not args.no_seg,
        )
    path = generate_cohort(
        out_dir,
        n_subjects=args.n_subjects,
        site=site,
        seed=args.seed,
        shape=shape,
        layout=args.layout,
        id_prefix=args.id_prefix,
        with_seg=not args.no_seg,
        start_index=args.start_index,
    )
    label = args.site if not args.settings else f"{args.site} with {' '.join(args.settings)}"
    print(_describe("cohort", path, args.n_subjects, label, args.seed, shape, args.layout))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (2 with one line per problem on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_reporting_errors(PROG, lambda: _run(args), verbose=args.verbose or None)


if __name__ == "__main__":
    sys.exit(main())
