"""``report.md`` and a self-contained ``report.html`` (images embedded as base64), built from the
same block list so the two always say the same thing.

Size: one block list renders both report.md and report.html; splitting the sections would split
that list and let the two formats drift apart.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from collections.abc import Mapping
from pathlib import Path

from aad_med import CHANNELS
from aad_med.io_utils import write_text_atomic
from aad_med.report.text import (
    BENCHMARK_SOURCE,
    DEFINITIONS,
    INTENSITY_EXPLANATION,
    LIMITATIONS,
    OMNIBUS_INTRO,
    SCALE_SENTENCES,
    SUBJECT_DEFINITIONS,
    SUBJECTS_INTRO,
    _fmt,
    calibration_intro,
    drift_sentence,
    features_paragraph,
    fmt_p,
    interpretation,
    latent_sentence,
    omnibus_headline,
    overlap_warning,
    provenance_paragraph,
    sensitivity_table,
)

CAPTIONS: dict[str, str] = {
    "latent_means": "Each cohort's mean latent vector with 95% bootstrap bands; dimensions "
    "ordered by their share of AAD² (bars below: the pair furthest above its null). Where the lines separate beyond "
    "their bands, the cohorts differ.",
    "latent_pca": "Subjects in the first two principal axes of latent space; × marks cohort "
    "means, ellipses hold about 95% of each cohort.",
    "null_distribution": "AAD under random shuffles of cohort labels (grey) and the observed AAD "
    "(line). The p-value is the share of shuffles reaching the line.",
    "pairwise_aad": "AAD between every pair of cohorts.",
    "mds": "Cohorts placed so that their distances approximate the pairwise AAD.",
    "dendrogram": "Cohorts clustered by AAD.",
    "attribution": "Latent dimensions carrying the largest share of AAD² for each pair.",
}

FEATURE_CAPTIONS: dict[str, str] = {
    "latent_pca": "Subjects in the first two principal axes of the {features} vectors the "
    "statistics used; × marks cohort means, ellipses hold about 95% of each cohort.",
    "attribution": "Dimensions of the {features} vectors carrying the largest share of AAD² for "
    "each pair.",
    "latent_means": "Each cohort's mean latent vector (the seed's embedding, not the {features} "
    "vectors of the statistics) with 95% bootstrap bands; dimensions ordered by their share of "
    "the latent AAD² (bars below: the pair furthest above its latent null). Where the lines "
    "separate beyond their bands, the mean latents differ.",
}
"""Captions of the figures that change meaning when the features are not ``latent``."""

Block = tuple


def _omnibus_blocks(result: Mapping, pairs: list) -> list[Block]:
    """The report's lead: one verdict per pair from the omnibus test (none without it)."""
    alpha = float(result.get("alpha", 0.05))
    lines = [omnibus_headline(p, alpha, len(pairs)) for p in pairs]
    lines = [line for line in lines if line]
    if not lines:
        return []
    return [("h2", "Do the cohorts differ at all?"), ("p", OMNIBUS_INTRO), ("ul", lines)]


def build_blocks(result: Mapping, images: Mapping[str, str | Path] | None = None) -> list[Block]:
    """The report as a list of blocks: ``("h1"|"h2"|"h3"|"p"|"warn", text)``,
    ``("table", header, rows)``, ``("img", caption, path)``, ``("dl", [(term, text)])``,
    ``("ul", [text])``."""
    images = dict(images or {})
    cohorts = result.get("cohorts", {})
    pairs = list(result.get("pairs", []))
    settings = result.get("settings", {})
    b: list[Block] = [("h1", "AAD cohort comparison")]
    b.append(
        (
            "p",
            (
                f"Checkpoint `{result.get('checkpoint', '?')}`; features `{result.get('features', 'latent')}`; "
                f"latent dimension {result.get('latent_dim', '?')}; "
                f"{_fmt(settings.get('n_permutations'))} permutations, "
                f"{_fmt(settings.get('n_bootstrap'))} bootstrap resamples, seed {settings.get('seed', '?')}. "
                f"Written {result.get('created', _dt.datetime.now().isoformat(timespec='seconds'))}."
            ),
        )
    )
    made = provenance_paragraph(result.get("provenance"))
    if made:
        b.append(("p", made))
    warning = overlap_warning(cohorts)
    if warning:
        b.append(("h2", "⚠ WARNING: training subjects among the compared cohorts"))
        b.append(("warn", warning))
    b.extend(("warn", f"Caveat: {c}") for c in result.get("caveats") or [])
    b.extend(_omnibus_blocks(result, pairs))
    if result.get("scale") in SCALE_SENTENCES:
        b.append(("p", SCALE_SENTENCES[result["scale"]]))
    b.append(("h2", "Cohorts"))
    b.append(
        (
            "table",
            ["cohort", "subjects", "path", "used in training"],
            [
                [
                    name,
                    str(info.get("n_subjects", "?")),
                    f"`{info.get('path', '')}`",
                    str(info.get("train_overlap", 0)),
                ]
                for name, info in cohorts.items()
            ],
        )
    )
    skipped = [(name, line) for name, info in cohorts.items() for line in info.get("skipped") or []]
    if skipped:
        b.append(("p", f"{len(skipped)} invalid subject(s) were left out (skip_invalid):"))
        b.append(("table", ["cohort", "left out"], [[n, line] for n, line in skipped]))
    b.append(("h2", "Summary"))
    b.append(_summary_table(result, pairs))
    with_intensity = any(p.get("intensity_p") is not None for p in pairs)
    if with_intensity:
        b.append(("p", INTENSITY_EXPLANATION))
    features = str(result.get("features", "latent"))
    b.append(("h2", "What these features can and cannot see"))
    b.append(("p", features_paragraph(features)))
    header, rows = sensitivity_table(features, latent=True, intensity=with_intensity)
    b.append(("table", header, rows))
    b.append(("p", BENCHMARK_SOURCE))
    enc = result.get("encoders")
    if enc:
        b.extend(_encoder_blocks(enc))
    for p in pairs:
        b.append(("h2", f"{p['a']} vs {p['b']}"))
        headline = omnibus_headline(p, float(result.get("alpha", 0.05)), len(pairs))
        if headline:
            b.append(("p", headline))
        b.append(("p", interpretation(p)))
        latent = latent_sentence(p)
        if latent:
            b.append(("p", latent))
        b.append(("table", ["statistic", "value"], _pair_rows(p)))
        equivalent = p.get("equivalent_severity")
        if equivalent:
            b.append(("h3", "What this AAD is comparable to"))
            b.append(("p", calibration_intro(equivalent, result.get("calibration"))))
            b.append(("ul", list(equivalent.get("statements") or [])))
            b.extend(("warn", w) for w in equivalent.get("warnings") or [])
        top = p.get("top_dims") or []
        if top:
            dims = ", ".join(f"z{int(d)} ({100 * float(s):.0f}%)" for d, s in top[:5])
            b.append(("p", f"Largest shares of AAD²: {dims}."))
        if p.get("mean_difference_png"):
            b.append(
                (
                    "img",
                    f"decode(mean of {p['b']}) − decode(mean of {p['a']}): what the "
                    "latent mean difference looks like in image space (one patch).",
                    p["mean_difference_png"],
                )
            )
    b.extend(_drift_blocks(result.get("drift")))
    b.extend(_subject_blocks(result.get("subjects")))
    regional = result.get("regional") or {}
    if regional:
        b.append(("h2", "Where in the brain"))
        if regional.get("note"):
            b.append(("p", str(regional["note"])))
        for item in regional.get("images", []):
            b.append(("img", item.get("caption", "Regional AAD"), item["png"]))
    if images:
        b.append(("h2", "Figures"))
        features = str(result.get("features", "latent"))
        for key, path in images.items():
            caption = CAPTIONS.get(key, key)
            if features != "latent" and key in FEATURE_CAPTIONS:
                caption = FEATURE_CAPTIONS[key].format(features=features)
            b.append(("img", caption, path))
    b.append(("h2", "What each number means"))
    # Only report/text.py explains statistics (never a copy carried in the result).
    b.append(("dl", list(DEFINITIONS.items())))
    b.append(("h2", "What AAD cannot see"))
    b.append(("p", LIMITATIONS))
    return b


QUALITY_SUMMARY_METRICS = ("snr_total", "cnr", "cjv", "efc", "inu_range", "wm2max")
"""IQMs of the report's per-cohort quality table (median [IQR] per channel)."""


def _drift_blocks(drift: Mapping | None) -> list[Block]:
    if not drift:
        return []
    ref = str(drift.get("reference", "?"))
    points = list(drift.get("batches") or [])
    b: list[Block] = [("h2", "Drift against the reference")]
    b.append(("p", drift_sentence(points, ref)))
    rows = [
        [
            str(pt["batch"]),
            _aad_ci(pt),
            fmt_p(pt.get("aad_p")),
            str(pt.get("n_p05", "?")),
        ]
        for pt in points
    ]
    b.append(("table", ["batch", "AAD [95% CI]", "p", "subjects with p ≤ 0.05"], rows))
    if drift.get("png"):
        b.append(("img", f"AAD of each batch against {ref} with its 95% CI and p.", drift["png"]))
    return b


def _subject_blocks(subjects: Mapping | None) -> list[Block]:
    if not subjects:
        return []
    ref = str(subjects.get("reference_cohort", "?"))
    b: list[Block] = [("h2", "Which subjects are different")]
    b.append(
        (
            "p",
            SUBJECTS_INTRO.format(reference=ref, n_reference=subjects.get("n_reference", "?")),
        )
    )
    if subjects.get("note"):
        b.append(("warn", str(subjects["note"])))
    counts = subjects.get("counts") or {}
    b.append(
        (
            "table",
            ["cohort", "subjects", "p ≤ 0.05", "q ≤ 0.05 (tail)"],
            [
                [name, str(c.get("n")), str(c.get("n_p05")), str(c.get("n_q05"))]
                for name, c in counts.items()
            ],
        )
    )
    b.append(("h3", "Most atypical subjects"))
    rows = [
        [
            str(r["cohort"]),
            str(r["subject_id"]),
            _fmt(r.get("atypicality")),
            fmt_p(r.get("atypicality_p")),
            fmt_p(r.get("atypicality_p_tail")),
            fmt_p(r.get("atypicality_q_tail")),
            fmt_p(r.get("intensity_p")),
            str(r.get("reason", "")),
        ]
        for r in subjects.get("most_atypical") or []
    ]
    header = ["cohort", "subject", "score", "p", "p (tail)", "q (tail)", "intensity p", "why"]
    b.append(("table", header, rows))
    for r in subjects.get("most_atypical") or []:
        if r.get("thumbnail"):
            caption = f"{r['cohort']} / {r['subject_id']}: middle axial slice of each channel."
            b.append(("img", caption, r["thumbnail"]))
    quality = subjects.get("quality")
    if quality:
        b.append(("h3", "Image quality per cohort"))
        b.append(("p", "Median [interquartile range] of each image-quality metric, per channel."))
        for metric in QUALITY_SUMMARY_METRICS:
            rows = []
            for name, cols in quality.items():
                row = [name]
                for ch in CHANNELS:
                    med, lo, hi = cols.get(f"{ch}_{metric}", [None, None, None])
                    row.append(f"{_fmt(med)} [{_fmt(lo)}, {_fmt(hi)}]")
                rows.append(row)
            b.append(("table", [metric, *CHANNELS], rows))
        if subjects.get("quality_png"):
            b.append(
                (
                    "img",
                    "Image-quality metrics of each cohort side by side (box: quartiles; dots: "
                    "subjects).",
                    subjects["quality_png"],
                )
            )
    b.append(("h3", "Columns of subjects.csv"))
    b.append(("dl", list(SUBJECT_DEFINITIONS.items())))
    return b


def _encoder_blocks(enc: Mapping) -> list[Block]:
    n = enc.get("n_encoders", len(enc.get("encoders", [])))
    b: list[Block] = [("h2", f"Encoder uncertainty ({n} encoders)")]
    b.append(
        (
            "p",
            (
                "The same comparison with every checkpoint given. AAD's scale belongs to the encoder, so "
                "the spread across encoders is part of the uncertainty: the interval below combines the "
                "subject bootstrap with encoder-to-encoder variance. The figures and per-pair sections "
                f"further down use the first checkpoint, `{(enc.get('encoders') or ['?'])[0]}`."
            ),
        )
    )
    rows = []
    for p in enc.get("pairs", []):
        lo, hi = (p.get("aad_interval") or [None, None])[:2]
        rows.append(
            [
                f"{p['a']} vs {p['b']}",
                ", ".join(_fmt(v) for v in p.get("aad_per_encoder", [])),
                f"{_fmt(p.get('aad_mean'))} [{_fmt(lo)}, {_fmt(hi)}]",
                f"{p.get('n_encoders_significant', '?')} of {n}",
            ]
        )
    b.append(
        (
            "table",
            [
                "pair",
                "AAD per encoder",
                "mean AAD [combined 95% interval]",
                "encoders with FDR p < 0.05",
            ],
            rows,
        )
    )
    rho = (enc.get("rank_stability") or {}).get("spearman_mean")
    if rho is not None:
        b.append(
            (
                "p",
                f"Rank stability: the encoders order the cohort pairs alike with a mean "
                f"Spearman correlation of {_fmt(rho)} (1 = identical order).",
            )
        )
    return b


def _summary_table(result: Mapping, pairs: list[Mapping]) -> Block:
    """One row per pair: the AAD of the chosen features, then, as their own labelled columns,
    the seed's latent AAD (when other features were used)."""
    features = str(result.get("features", "latent"))
    label = "AAD [95% CI]" if features == "latent" else f"AAD ({features}) [95% CI]"
    header = ["pair", label, "p", "FDR p", "× null median", "standardized"]
    latent = any(p.get("latent_aad") is not None for p in pairs)
    if latent:
        header += ["seed's latent AAD [95% CI]", "latent AAD p (FDR)", "latent × null median"]
    intensity = any(p.get("intensity_p") is not None for p in pairs)
    if intensity:
        header += ["intensity fingerprint p (FDR), not an AAD"]
    rows = []
    for p in pairs:
        row = [
            f"{p['a']} vs {p['b']}",
            _aad_ci(p),
            fmt_p(p.get("aad_p")),
            fmt_p(p.get("aad_p_fdr")),
            _fmt(p.get("aad_null_ratio")),
            _fmt(p.get("aad_standardized")),
        ]
        if latent:
            row += [
                _aad_ci(p, "latent_aad"),
                f"{fmt_p(p.get('latent_aad_p'))} ({fmt_p(p.get('latent_aad_p_fdr'))})",
                _fmt(p.get("latent_aad_null_ratio")),
            ]
        if intensity:
            row.append(f"{fmt_p(p.get('intensity_p'))} ({fmt_p(p.get('intensity_p_fdr'))})")
        rows.append(row)
    return ("table", header, rows)


def _aad_ci(p: Mapping, key: str = "aad") -> str:
    ci = p.get(f"{key}_ci95") or [None, None]
    return f"{_fmt(p.get(key))} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _pair_rows(p: Mapping) -> list[list[str]]:
    rows = [
        ["subjects (a, b)", f"{p.get('n_a', '?')}, {p.get('n_b', '?')}"],
        ["AAD [95% CI]", _aad_ci(p)],
        [
            "AAD p (permutation)",
            f"{fmt_p(p.get('aad_p'))} ({_fmt(p.get('n_permutations'))} permutations)",
        ],
        ["AAD p, FDR-adjusted", fmt_p(p.get("aad_p_fdr"))],
        ["null median AAD", _fmt(p.get("aad_null_median"))],
        ["AAD / null median", _fmt(p.get("aad_null_ratio"))],
        ["unbiased AAD²", _fmt(p.get("aad2_unbiased"))],
        ["standardized AAD (effect size)", _fmt(p.get("aad_standardized"))],
    ]
    if p.get("latent_aad") is not None:
        rows += [
            ["seed's latent AAD [95% CI]", _aad_ci(p, "latent_aad")],
            [
                "latent AAD p (permutation; FDR-adjusted)",
                f"{fmt_p(p.get('latent_aad_p'))}; {fmt_p(p.get('latent_aad_p_fdr'))}",
            ],
            ["latent AAD / its null median", _fmt(p.get("latent_aad_null_ratio"))],
        ]
    if p.get("intensity_p") is not None:
        rows += [
            [
                "intensity fingerprint distance (not an AAD; / null median)",
                f"{_fmt(p.get('intensity_distance'))} ({_fmt(p.get('intensity_null_ratio'))}×)",
            ],
            [
                "intensity fingerprint p (permutation; FDR-adjusted)",
                f"{fmt_p(p.get('intensity_p'))}; {fmt_p(p.get('intensity_p_fdr'))}",
            ],
        ]
    optional = [
        ("Hotelling T² (p)", "hotelling_t2", "hotelling_p"),
        ("RBF MMD² (p)", "mmd2", "mmd_p"),
        ("energy distance (p)", "energy", "energy_p"),
        ("Fréchet distance", "frechet", None),
        ("AKLD (histogram KL)", "akld", None),
    ]
    for label, key, pkey in optional:
        if p.get(key) is not None:
            value = _fmt(p.get(key))
            if pkey:
                value += f" (p = {fmt_p(p.get(pkey))})"
            rows.append([label, value])
    if p.get("ks_dims_fdr") is not None:
        dims = p.get("ks_dims_fdr") or []
        rows.append(
            [
                "dimensions differing by KS (FDR 5%)",
                ", ".join(f"z{int(d)}" for d in dims) if dims else "none",
            ]
        )
    return rows


def render_markdown(blocks: list[Block], base: Path | None = None) -> str:
    """Markdown text; image paths written relative to ``base`` when given."""
    out: list[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {blk[1]}\n")
        elif kind == "p":
            out.append(f"{blk[1]}\n")
        elif kind == "warn":
            out.append(f"> **⚠ {blk[1]}**\n")
        elif kind == "table":
            header, rows = blk[1], blk[2]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
            out.append("")
        elif kind == "img":
            rel = _relative(Path(blk[2]), base)
            out.append(f"![{Path(blk[2]).stem}]({rel})\n\n*{blk[1]}*\n")
        elif kind == "dl":
            out.extend(f"- **{term}**: {text}" for term, text in blk[1])
            out.append("")
        elif kind == "ul":
            out.extend(f"- {text}" for text in blk[1])
            out.append("")
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:0.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}
.warn{background:#fde8e0;border:3px solid #D55E00;padding:0.8em;font-weight:bold}
figure{margin:1em 0}figcaption{font-style:italic;color:#444}code{background:#f5f5f5}
"""


def render_html(blocks: list[Block], base: Path | None = None) -> str:
    """Self-contained HTML: every image is embedded as a base64 data URI."""
    out = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        "<title>AAD cohort comparison</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "warn":
            out.append(f"<div class='warn'>⚠ {_inline(blk[1])}</div>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in blk[1]) + "</tr>")
            out.extend(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in blk[2]
            )
            out.append("</table>")
        elif kind == "img":
            path = Path(blk[2])
            if base is not None and not path.is_absolute():
                path = base / path
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(
                f"<figure><img alt='{html.escape(path.stem)}' "
                f"src='data:image/png;base64,{data}'>"
                f"<figcaption>{_inline(blk[1])}</figcaption></figure>"
            )
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in blk[1]) + "</ul>")
        elif kind == "dl":
            out.append("<dl>")
            for term, text in blk[1]:
                out.append(f"<dt><b>{html.escape(term)}</b></dt><dd>{_inline(text)}</dd>")
            out.append("</dl>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _relative(path: Path, base: Path | None) -> str:
    if base is None or not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def write_report(
    result: Mapping,
    out_dir: str | Path,
    images: Mapping[str, str | Path] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``.

    Args:
        result: the content of ``distances.json`` (statistics plus run context). Pairs may carry
            ``mean_difference_png``; ``result["regional"]`` may carry ``note`` and ``images``.
        out_dir: folder of the report; image paths may be relative to it.
        images: ``{figure key: png path}`` for the Figures section (keys as in :data:`CAPTIONS`).

    Returns:
        ``(report.md, report.html)`` paths.
    """
    out_dir = Path(out_dir)
    blocks = build_blocks(result, images)
    md = write_text_atomic(out_dir / "report.md", render_markdown(blocks, out_dir))
    page = write_text_atomic(out_dir / "report.html", render_html(blocks, out_dir))
    return md, page
