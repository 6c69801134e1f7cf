"""``aad-reference``: fit a reference cohort once, for later ``aad-compare reference=REF`` runs
(thin entry point over :func:`aad_med.pipelines.reference.fit_reference`).

Example::

    aad-reference fit checkpoint=runs/train/checkpoints/best.pt cohort=data/site_a out=refs/site_a

writes ``refs/site_a.json`` and ``refs/site_a.npz``; then

    aad-compare checkpoint=runs/train/checkpoints/best.pt reference=refs/site_a.json \\
        cohorts.batch1=data/batch1 cohorts.batch2=data/batch2

Arguments are ``key=value`` like the Hydra commands' (no config file: the keys are few).
Expected failures print ``aad-reference: error: <line>`` and exit with code 2; nothing is
written then, and an existing ``out`` is refused unless ``overwrite=true``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aad_med import DEFAULT_FEATURES
from aad_med.cli._errors import EXIT_INPUT_ERROR, run_reporting_errors, verbose_requested
from aad_med.errors import ConfigError

PROG = "aad-reference"

USAGE = f"""usage: aad-reference fit checkpoint=CKPT cohort=DIR_OR_CSV out=REF [KEY=VALUE ...]

example:
  aad-reference fit checkpoint=runs/train/checkpoints/best.pt cohort=data/site_a out=refs/site_a

Encodes a reference cohort once and writes REF.json + REF.npz (raw feature vectors, intensity
fingerprint, image-quality metrics, checkpoint SHA-256, preprocessing, aad-med version; no
pickle). Then `aad-compare checkpoint=CKPT reference=REF.json cohorts.NEW=DIR ...` tests new
cohorts against it without re-encoding it (same numbers as encoding both).

Keys (defaults):
  checkpoint=CKPT            checkpoint written by aad-train (required)
  cohort=DIR_OR_CSV          the reference cohort (required)
  out=REF                    output name; REF.json and REF.npz are written (required)
  name=reference             the reference cohort's name in later comparisons
  embedding.features={DEFAULT_FEATURES}
  embedding.batch_size=32    embedding.num_workers=0    embedding.cache=true
  embedding.cache_dir=null   embedding.progress=true
  device=auto                auto | cpu | cuda | cuda:N
  skip_invalid=false         leave invalid subjects out instead of stopping
  overwrite=false            replace an existing REF.json/REF.npz
--version prints the version, --verbose shows tracebacks."""

KEYS = {
    "checkpoint": str,
    "cohort": str,
    "out": str,
    "name": str,
    "embedding.features": str,
    "embedding.batch_size": int,
    "embedding.num_workers": int,
    "embedding.cache": bool,
    "embedding.cache_dir": str,
    "embedding.progress": bool,
    "device": str,
    "skip_invalid": bool,
    "overwrite": bool,
    "verbose": bool,
}


def _value(key: str, text: str):
    kind = KEYS[key]
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"{key} must be true or false, got {text!r}")
        return text.lower() == "true"
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {text!r}") from None
    return None if text.lower() in ("null", "none") and key == "embedding.cache_dir" else text


def parse_overrides(args: Sequence[str]) -> dict:
    """``key=value`` arguments as a dict of typed values.

    Raises:
        ConfigError: an argument without ``=``, an unknown key, a bad value, or a missing
            required key.
    """
    out: dict = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep:
            raise ConfigError(f"expected KEY=VALUE, got {arg!r} (aad-reference --help)")
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(KEYS)}")
        out[key] = _value(key, text)
    missing = [k for k in ("checkpoint", "cohort", "out") if not out.get(k)]
    if missing:
        raise ConfigError(
            f"{', '.join(k + '=...' for k in missing)} required (aad-reference --help)"
        )
    return out


def fit_from_overrides(values: dict) -> str:
    """Run ``aad-reference fit`` with parsed ``values``; returns the written ``REF.json`` path."""
    from aad_med.pipelines.reference import ReferenceSettings, fit_reference

    settings = ReferenceSettings(
        name=values.get("name", "reference"),
        features=values.get("embedding.features", DEFAULT_FEATURES),
        device=values.get("device", "auto"),
        batch_size=values.get("embedding.batch_size", 32),
        num_workers=values.get("embedding.num_workers", 0),
        cache=values.get("embedding.cache", True),
        cache_dir=values.get("embedding.cache_dir"),
        skip_invalid=values.get("skip_invalid", False),
        progress=values.get("embedding.progress", True),
        overwrite=values.get("overwrite", False),
    )
    ref = fit_reference(values["checkpoint"], values["cohort"], values["out"], settings)
    return str(ref.path)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point (``aad-reference``); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        from aad_med import __version__

        print(f"{PROG} {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help") or "--help" in args or "-h" in args:
        print(USAGE)
        return 0
    verbose = verbose_requested(args)
    args = [a for a in args if a not in ("-v", "--verbose")]

    def fn() -> int:
        if args[0] != "fit":
            raise ConfigError(f"unknown subcommand {args[0]!r}; the subcommand is 'fit'")
        values = parse_overrides(args[1:])
        path = fit_from_overrides(values)
        print(f"{PROG}: wrote {path} and its .npz")
        return 0

    rc = run_reporting_errors(PROG, fn, verbose=verbose)
    return EXIT_INPUT_ERROR if rc == EXIT_INPUT_ERROR else rc


if __name__ == "__main__":
    sys.exit(main())
