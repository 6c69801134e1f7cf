"""Plain-language text of the report, in one place: what each number means, what AAD cannot see,
what each feature set and the intensity fingerprint can and cannot see (from the sensitivity
benchmark), the interpretation of one pair, and the train-overlap warning. Pure functions of the
result dict.

Size: long by design: all prose that explains a statistic lives in this one place (issue 12), so
each sentence can be checked against the code it describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

ALPHA = 0.05

INTENSITY_EXPLANATION = (
    "The intensity fingerprint compares each channel's foreground intensity percentiles read "
    "from the raw images before normalisation, so it sees global intensity, contrast and "
    "bias-field differences that normalisation hides from the encoder; it is its own statistic, "
    "not an AAD."
)

DEFINITIONS: dict[str, str] = {
    # The one place statistic prose lives: the report and distances.json ("definitions") read
    # it; aad_med.distances returns numbers only.
    "aad": "Autoencoder Average Distance: Euclidean distance between the two cohorts' mean "
    "vectors of the chosen features (with `latent`, each subject's vector is the mean of its "
    "patch latents). Its scale depends on the encoder and the features, so compare it with the "
    "null median and the CI, not across encoders or feature sets. With a fixed scale (scale "
    "'checkpoint' or 'reference') every feature is in units of its spread among the reference "
    "subjects, so the same pair gives the same AAD in any run with that checkpoint.",
    "aad_unbiased": "Bias-corrected AAD, sqrt(max(0, aad2_unbiased)): the AAD with the part "
    "that sampling noise alone adds removed. Plain AAD is above 0 even for two samples of one "
    "population (about the null median); this estimate is 0 in about half of such comparisons "
    "and follows the true distance between the population means once it is above the noise. "
    "Read the size of a difference from this value and aad_ci95.",
    "aad2_unbiased": "Squared AAD minus the part expected from sampling noise alone "
    "(trace of each cohort's covariance over its size); about 0, possibly negative, when the "
    "means are equal. Equal to the unbiased linear-kernel MMD². aad2_unbiased_se is its "
    "standard error (unbiased variance estimate, Chen & Qin 2010); aad2_moments holds the "
    "variance pieces aad_ci95 is built from.",
    "aad_ci95": "95% confidence interval for the distance between the two population means "
    "(the AAD one would get with unlimited subjects). Built for the unbiased squared distance "
    "from its estimated variance and skew, not by bootstrap, and mapped to the distance scale; "
    "its lower bound is 0 when the data cannot rule out equal means. Measured coverage "
    "(scripts/coverage.py, BENCHMARKS.md) is 0.93-0.99 from 12 subjects per cohort up to 256 "
    "dimensions, also for heavy-tailed data (wide side for small distances; 0.92 at worst "
    "with 8 subjects in one cohort). It does not depend on the seed.",
    "aad_p": "Permutation p-value: how often shuffling the cohort labels of subjects gives an "
    "AAD at least as large as observed, p = (k+1)/(B+1). Small p means the means differ more "
    "than chance allows.",
    "aad_p_fdr": "aad_p adjusted for comparing several pairs (Benjamini-Hochberg false discovery "
    "rate). Use this one when more than two cohorts are compared.",
    "aad_null_median": "Median AAD when cohort labels are shuffled: the AAD two random halves of "
    "the same subjects would show. The floor that sampling noise alone produces.",
    "aad_null_ratio": "AAD divided by the null median. About 1 means 'no more different than "
    "random splits'; 2 means twice the noise floor.",
    "aad_standardized": "Bias-corrected standardised distance between the population means: "
    "the root of the sum over dimensions of the squared mean shift in units of that "
    "dimension's within-cohort standard deviation (squared Cohen's d, corrected for sampling "
    "noise), unchanged when a dimension is rescaled. With no shift its median is 0 whatever "
    "the number of dimensions and subjects; a shift of 1 SD in one dimension gives about 1. "
    "It ignores correlations between dimensions, and with few subjects and many dimensions it "
    "is noisy (no shift, 12 vs 12 subjects, 256 dimensions: 95% of values below 2.6).",
    "hotelling_t2": "Hotelling's T² for equal mean vectors, the statistic hotelling_p belongs "
    "to: with more subjects than dimensions the textbook pooled covariance and an exact F "
    "p-value; otherwise T² with a Ledoit-Wolf covariance estimated without the cohort labels "
    "(hotelling_covariance 'ledoit_wolf_label_free') and a permutation p-value from the same "
    "shuffles as aad_p.",
    "mmd2": "Squared maximum mean discrepancy with a Gaussian kernel (median bandwidth, "
    "unbiased): sensitive to any difference of distribution, not only of the mean. mmd_p is "
    "its permutation p-value.",
    "energy": "Energy distance between the two sets of subject vectors: zero only for equal "
    "distributions; sees differences in spread too. energy_p is its permutation p-value.",
    "frechet": "Fréchet distance between Gaussians fitted to each cohort (mean term plus "
    "covariance term), as in FID. Grows with differences in mean or spread.",
    "akld": "McCaffrey's original variant: per latent dimension, symmetric KL divergence between "
    "the two cohorts' 10-bin histograms (smoothing 1e-4), averaged over dimensions. "
    "Descriptive only, for comparison with McCaffrey's papers: it has no p-value or null "
    "reference, its no-difference level is large and depends on the smoothing (20 vs 20 "
    "subjects: about 2.1, while a 0.5-SD shift gives 2.7), and one outlying subject can change "
    "it several-fold. Use aad_p, mmd_p or energy_p to decide whether cohorts differ.",
    "ks_dims_fdr": "Latent dimensions whose distributions differ by a Kolmogorov-Smirnov test "
    "after Benjamini-Hochberg correction across dimensions.",
    "top_dims": "Latent dimensions ranked by their share of AAD² ((Δμ_j)² / AAD²): where in the "
    "latent vector the distance lives.",
    "features": "The feature set turning each subject into the vector AAD and the other "
    "statistics compare (named at the top of the report; 'latent' is the seed's mean of patch "
    "latents).",
    "latent_aad": "The seed's AAD, always computed beside the chosen features: distance between "
    "the cohorts' mean latent vectors, each subject's vector being the mean of its patch "
    "latents. latent_aad_unbiased, latent_aad_ci95, latent_aad_p, latent_aad_p_fdr and "
    "latent_aad_null_ratio are its bias-corrected value, confidence interval (as aad_ci95), "
    "permutation p-value (same permutations count and seed), FDR-adjusted p-value and ratio "
    "to its null median.",
    "intensity_distance": "Distance between the cohorts' mean intensity fingerprints (per "
    "channel, the 1st to 99th foreground percentiles of the raw images, each z-scored over the "
    "pair's subjects, so a pair gets the same value whatever else is compared); intensity_fingerprint.csv holds the raw values. Not an AAD: no encoder "
    "is involved.",
    "intensity_p": "Permutation p-value of intensity_distance (label shuffles, same count and "
    "seed as aad_p); intensity_p_fdr is the same p adjusted across pairs. Small p: the raw "
    "intensities differ (scanner gain, contrast, bias field, or anatomy that changes the "
    "histograms).",
    "equivalent_severity": "With calibration=PATH: for each artefact of an aad-calibrate run "
    "made with the same encoder, the severity whose shifted copy of the reference gives, on "
    "average, the observed AAD at the nearest calibrated cohort size ('comparable to'), with a "
    "warning when the calibration's checkpoint or features differ.",
    "omnibus_p": "The omnibus verdict on 'do these cohorts differ at all?': one exact "
    "permutation test combining the AAD on the chosen features, the raw-image intensity "
    "fingerprint (standardised over the pair), and MMD and energy distance on the features. "
    "Every component is evaluated on the same label shuffles (stats.n_permutations of them), "
    "each turned into a p-value within its own shuffles, and the smallest of them (min-p) is "
    "ranked among the shuffles' smallest, so p = (k+1)/(B+1) is exact whatever the dependence "
    "between the components. At the project's defaults it flagged noise, blur, gamma, bias "
    "field and population shifts at p < 0.01 in every repeat, with a same-site rate at alpha "
    "(BENCHMARKS.md). The AAD keeps its own p-value (aad_p) as the distance.",
    "omnibus_p_fdr": "omnibus_p adjusted across pairs (Benjamini-Hochberg, as aad_p_fdr). Use "
    "this one when more than two cohorts are compared.",
    "omnibus_driver": "The omnibus component with the smallest p-value: the kind of difference "
    "that carried the verdict (aad: mean of the features; fingerprint: raw intensities such as "
    "gain, contrast or bias field; mmd, energy: the shape or spread of the features' "
    "distribution).",
    "omnibus_components": "Each omnibus component's own permutation p-value, from the same "
    "shuffles as omnibus_p (aad equals aad_p up to the shuffles' seed; fingerprint equals "
    "intensity_p up to the shuffles' seed). Uncorrected: read the verdict from omnibus_p.",
    "omnibus_statistics": "Each omnibus component's observed value (AAD; fingerprint distance "
    "after standardising over the pair; unbiased MMD²; energy distance).",
    "omnibus_combine": "How the omnibus combines its components' p-values: min_p (reacts to "
    "the single strongest component).",
    "scale": "How the feature vectors were standardised. 'checkpoint': with the fixed centre and "
    "scale aad-train stored from the encoder's training and validation subjects "
    "(feature_reference), so a pair's AAD and p-values are the same in any call with this "
    "checkpoint; 'reference': the same, fitted on the cohort given as embedding.reference; "
    "'pooled': fitted on all compared subjects (older checkpoints), so a pair's AAD changes "
    "when other cohorts are compared with it; 'raw': latent means, not standardised.",
    "null_aad_sample": "A random sample of AAD values under label shuffles (for plotting).",
    "train_overlap": "Number of a cohort's subjects that were used to train the encoder. The "
    "encoder has seen them, so they sit unusually well in latent space and the tests become "
    "over-sensitive.",
}

LIMITATIONS = (
    "AAD compares only the cohorts' **mean** vectors. It cannot see a change of spread with "
    "equal means (e.g. one site with more varied images but the same average), a shift that "
    "cancels out across subjects, or image properties its features discard (see 'What these "
    "features can and cannot see'). The MMD, energy and Fréchet statistics look beyond the "
    "mean; a non-significant AAD is not proof that the cohorts are alike."
)

# --------------------------------------------------------------------------------------------
# What each feature set can see: the sensitivity benchmark (scripts/sensitivity.py).

BENCHMARK_SOURCE = (
    "Detection rates from the project's sensitivity benchmark (scripts/sensitivity.py, "
    "BENCHMARKS.md): synthetic cohorts of 16 subjects each, one shift applied to an otherwise "
    "identical site, detection = AAD permutation p < 0.01 over 20 repeats; same-site false "
    "positives over 200 random splits of one site. Feature sets measured at the project's "
    "defaults (96x104x88 volumes, patch 32, latent 32, an encoder trained 20 epochs) are "
    "reported from that run, where the global intensity scale was not tested; the others "
    "(dispersion, position_matched, the latent+ combinations) from a scaled-down run (patch 16, "
    "8 epochs). Rates with another encoder, other data or other cohort sizes will differ: read "
    "them as what each kind of feature can see at all."
)

SHIFT_KINDS: dict[str, str] = {
    "noise": "scanner noise (Rician, 3% to 12% of white matter)",
    "blur": "resolution / blur (Gaussian, σ 1.2 voxels)",
    "gamma": "contrast (gamma 1.5)",
    "bias": "smooth bias field (about 7× stronger)",
    "intensity": "global intensity scale (×1.5)",
    "population": "population (smaller brains, larger tumours)",
}
"""The benchmark's shift kinds, in plain words, at the severity the rates refer to."""

FINGERPRINT = "intensity_fingerprint"


def _at_defaults(gamma: float, bias: float, noise: float, blur: float, population: float):
    """A row of the at-defaults table (its column order); the intensity scale was not run."""
    return dict(noise=noise, blur=blur, gamma=gamma, bias=bias, population=population)


DETECTION_RATES: dict[str, dict[str, float]] = {
    # BENCHMARKS.md "Sensitivity at the defaults", 16 subjects per cohort (gamma, bias, noise,
    # blur, population).
    "latent": _at_defaults(0.0, 0.0, 0.0, 0.0, 1.0),
    "multiscale": _at_defaults(0.0, 0.0, 0.5, 1.0, 1.0),
    "texture": _at_defaults(0.05, 0.0, 0.15, 1.0, 1.0),
    "multiscale+texture": _at_defaults(0.1, 0.0, 0.35, 1.0, 1.0),
    "input_texture": _at_defaults(0.0, 0.05, 1.0, 1.0, 1.0),
    "intensity_shape": _at_defaults(1.0, 0.5, 1.0, 1.0, 1.0),
    "intensity_variation": _at_defaults(0.0, 0.2, 0.0, 0.05, 1.0),
    "multiscale+texture+intensity_shape": _at_defaults(1.0, 0.1, 1.0, 1.0, 1.0),
    "multiscale+texture+intensity_shape+intensity_variation": _at_defaults(1.0, 0.2, 0.8, 1.0, 1.0),
    "multiscale+input_texture+intensity_shape": _at_defaults(1.0, 0.25, 1.0, 1.0, 1.0),
    "texture+intensity_shape": _at_defaults(1.0, 0.3, 1.0, 1.0, 1.0),
    "intensity_shape+intensity_variation": _at_defaults(1.0, 0.45, 0.95, 1.0, 1.0),
    "input_texture+intensity_shape": _at_defaults(1.0, 0.4, 1.0, 1.0, 1.0),
    "input_texture+intensity_shape+intensity_variation": _at_defaults(1.0, 0.35, 1.0, 1.0, 1.0),
    FINGERPRINT: _at_defaults(1.0, 1.0, 1.0, 1.0, 1.0),
    # BENCHMARKS.md "Sensitivity to acquisition and population shifts" (scaled down), for the
    # sets not run at the defaults.
    "dispersion": dict(noise=0.0, blur=1.0, gamma=0.05, bias=0.0, intensity=0.0, population=0.5),
    "position_matched": dict(
        noise=0.0, blur=0.0, gamma=0.0, bias=0.0, intensity=0.0, population=0.45
    ),
    "latent+multiscale": dict(
        noise=0.0, blur=1.0, gamma=0.0, bias=0.0, intensity=0.0, population=0.95
    ),
    "latent+multiscale+dispersion": dict(
        noise=0.0, blur=1.0, gamma=0.05, bias=0.0, intensity=0.0, population=0.85
    ),
    "latent+multiscale+texture": dict(
        noise=0.85, blur=1.0, gamma=0.5, bias=0.0, intensity=0.0, population=1.0
    ),
    "latent+multiscale+texture+dispersion": dict(
        noise=0.35, blur=1.0, gamma=0.2, bias=0.0, intensity=0.0, population=1.0
    ),
}
"""Detection rate at the severities of :data:`SHIFT_KINDS`, 16 subjects per cohort, alpha 0.01;
a shift kind missing from a row was not run for it ("not measured")."""

SAME_SITE_FPR: dict[str, float] = {
    "latent": 0.01,
    "multiscale": 0.01,
    "texture": 0.015,
    "multiscale+texture": 0.02,
    "input_texture": 0.015,
    "intensity_shape": 0.0,
    "intensity_variation": 0.015,
    "multiscale+texture+intensity_shape": 0.02,
    "multiscale+texture+intensity_shape+intensity_variation": 0.02,
    "multiscale+input_texture+intensity_shape": 0.015,
    "texture+intensity_shape": 0.02,
    "intensity_shape+intensity_variation": 0.0,
    "input_texture+intensity_shape": 0.005,
    "input_texture+intensity_shape+intensity_variation": 0.005,
    FINGERPRINT: 0.005,
    "dispersion": 0.015,
    "position_matched": 0.0,
    "latent+multiscale": 0.025,
    "latent+multiscale+dispersion": 0.005,
    "latent+multiscale+texture": 0.01,
    "latent+multiscale+texture+dispersion": 0.0,
}
"""Share of same-site splits flagged at alpha 0.01 (Monte-Carlo standard error 0.007)."""

OMNIBUS_RATES: dict[str, float] = _at_defaults(1.0, 1.0, 1.0, 1.0, 1.0)
"""The omnibus (on multiscale+texture+intensity_shape plus the fingerprint) at the defaults;
same-site rate :data:`OMNIBUS_SAME_SITE_FPR`."""

OMNIBUS_SAME_SITE_FPR = 0.01

FEATURE_SUMMARIES: dict[str, str] = {
    "latent": "the mean of each subject's patch latents (the seed's AAD). It mostly sees "
    "anatomy and population differences; per-subject normalisation and the autoencoder's "
    "bottleneck remove scanner noise, blur, contrast and intensity, so it is blind to most "
    "scanner and protocol differences.",
    "multiscale+input_texture+intensity_shape": "per-stage channel statistics of the encoder, "
    "the roughness of the normalised input inside the brain at 1, 2 and 4 voxels, and the shape "
    "(quantiles, skewness, kurtosis) of each channel's normalised intensities. It sees noise, "
    "blur, gamma/contrast and population differences; a smooth bias field only sometimes at 16 "
    "subjects per cohort (always at 32), and never a global intensity scale (normalisation "
    "removes it): the intensity fingerprint and the omnibus verdict report those.",
    "multiscale+texture": "per-stage channel statistics of the encoder plus the scale-free "
    "roughness of the input and of every encoder stage. At the default patch size it sees blur "
    "and population differences, noise only sometimes, and hardly contrast (gamma); it cannot "
    "see a global intensity scale or a smooth bias field (normalisation removes both): the "
    "intensity fingerprint reports those.",
    "multiscale": "per-stage channel means and standard deviations of the encoder's activations. "
    "It sees blur and population differences, noise only sometimes, and not contrast, intensity "
    "scale or bias fields.",
    "texture": "the scale-free roughness of the input and of every encoder stage. At the default "
    "patch size it sees blur and population differences, hardly noise or contrast, and not "
    "intensity scale or bias fields.",
    "dispersion": "the mean and spread of the subject's patch latents. It sees blur and part "
    "of population differences, hardly contrast, not noise, intensity scale or bias fields.",
    "position_matched": "patch latents standardised per grid position (co-registered cohorts). "
    "It sees part of population differences and none of the scanner shifts.",
}
"""What each feature set is and which kinds of shift it sees, in plain words (from the
benchmark); combinations not listed are described by their parts."""


def _rate_word(rate: float) -> str:
    if rate >= 0.8:
        return f"seen ({100 * rate:.0f}%)"
    if rate >= 0.2:
        return f"sometimes ({100 * rate:.0f}%)"
    return f"not seen ({100 * rate:.0f}%)"


def features_paragraph(features: str) -> str:
    """Which features the statistics used and what they can and cannot see, in plain words."""
    summary = FEATURE_SUMMARIES.get(features)
    if summary is None:
        rates = DETECTION_RATES.get(features)
        if rates is None:
            return (
                f"The statistics used the feature set `{features}`, which the sensitivity "
                "benchmark did not measure: what it can see is unknown."
            )
        seen = [SHIFT_KINDS[k] for k, r in rates.items() if r >= 0.8]
        missed = [SHIFT_KINDS[k] for k, r in rates.items() if r < 0.2]
        summary = (
            f"a combination of {', '.join(features.split('+'))}. It sees "
            f"{', '.join(seen) or 'none of the benchmark shifts reliably'}; it cannot see "
            f"{', '.join(missed) or 'any shift it was tested on reliably'}."
        )
    text = f"The statistics used the feature set `{features}`: {summary}"
    if features != "latent":
        text += (
            " The seed's latent AAD is reported beside it (its own columns), so the two can be "
            "compared."
        )
    return text


def sensitivity_table(
    features: str, latent: bool = True, intensity: bool = True
) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)``: per shift kind, whether the used features, the seed's latent AAD and
    the intensity fingerprint saw it in the benchmark (rate in brackets)."""
    columns = [(features, f"AAD ({features})")]
    if latent and features != "latent":
        columns.append(("latent", "seed's latent AAD"))
    if intensity:
        columns.append((FINGERPRINT, "intensity fingerprint"))
    header = ["shift between cohorts", *(label for _, label in columns)]
    rows = []
    for kind, words in SHIFT_KINDS.items():
        row = [words]
        for name, _ in columns:
            rates = DETECTION_RATES.get(name) or {}
            row.append(_rate_word(rates[kind]) if kind in rates else "not measured")
        rows.append(row)
    fpr = ["same-site cohorts flagged (false positives, alpha 0.01)"]
    for name, _ in columns:
        value = SAME_SITE_FPR.get(name)
        fpr.append("not measured" if value is None else f"{100 * value:.1f}%")
    rows.append(fpr)
    return header, rows


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if x != x:
        return "n/a"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def fmt_p(p) -> str:
    """A p-value for humans: 3 significant digits, scientific notation below 0.001."""
    return _fmt(p)


OMNIBUS_COMPONENT_WORDS: dict[str, str] = {
    "aad": "the AAD (the mean of the encoder and intensity-shape features)",
    "fingerprint": "the intensity fingerprint (raw intensities: gain, contrast, bias field)",
    "mmd": "MMD (the shape of the features' distribution)",
    "energy": "the energy distance (the spread and shape of the features' distribution)",
}
"""What each omnibus component looks at, for the headline."""

OMNIBUS_INTRO = (
    "One exact test per pair of cohorts: the AAD, the raw-image intensity fingerprint and the "
    "MMD and energy distance, all on the same label shuffles, combined by their smallest "
    "p-value (omnibus_p). It sees every shift the sensitivity benchmark tried, including "
    "contrast and bias-field changes the AAD alone may miss; the component that drove it says "
    "what kind of difference it is. The AAD below remains the distance, with its own p-value."
)


SCALE_SENTENCES: dict[str, str] = {
    "checkpoint": "Feature scale: fixed, from the checkpoint (fitted by aad-train on the "
    "encoder's training and validation subjects), so each pair's AAD and p-values are the same "
    "whichever other cohorts are compared with it.",
    "reference": "Feature scale: fixed, fitted on the reference cohort given as "
    "embedding.reference, so each pair's AAD and p-values are the same whichever other cohorts "
    "are compared with it (and equal across runs with the same reference).",
    "pooled": "Feature scale: pooled over the compared subjects, because the checkpoint stores no "
    "feature reference (made before aad-train wrote one) and no embedding.reference was given: "
    "a pair's AAD changes when other cohorts are compared with it, so compare AAD values only "
    "within this run.",
}
"""What the ``scale`` of ``distances.json`` means for the reader (``raw``: nothing to say)."""


def omnibus_headline(pair: Mapping, alpha: float = ALPHA, n_pairs: int = 1) -> str | None:
    """The pair's verdict: do the cohorts differ at all, by the omnibus p, and what drove it
    (``None`` without an omnibus)."""
    p = pair.get("omnibus_p")
    if p is None:
        return None
    a, b = pair["a"], pair["b"]
    q = pair.get("omnibus_p_fdr") if n_pairs > 1 else None
    used = q if q is not None else p
    p_text = f"omnibus p = {fmt_p(p)}"
    if q is not None:
        p_text += f", FDR-adjusted across {n_pairs} pairs {fmt_p(q)}"
    driver = str(pair.get("omnibus_driver") or "")
    words = OMNIBUS_COMPONENT_WORDS.get(driver, driver)
    comps = pair.get("omnibus_components") or {}
    listing = ", ".join(f"{k} {fmt_p(v)}" for k, v in comps.items())
    if float(used) < alpha:
        text = (
            f"{a} vs {b}: do they differ at all? **Yes** ({p_text}), driven by {words}"
            f" (component p-values: {listing})."
        )
    else:
        text = (
            f"{a} vs {b}: do they differ at all? **No evidence** at α = {alpha:g} ({p_text}; "
            f"component p-values: {listing}). This is not proof that they are alike."
        )
    return text


def interpretation(pair: Mapping, alpha: float = ALPHA) -> str:
    """One plain-language sentence (or two) on what a pair's numbers mean."""
    if pair.get("interpretation"):
        return str(pair["interpretation"])
    a, b = pair["a"], pair["b"]
    p = pair.get("aad_p_fdr", pair.get("aad_p"))
    ratio = pair.get("aad_null_ratio")
    ci = pair.get("aad_ci95") or [None, None]
    head = f"AAD between {a} and {b} is {_fmt(pair.get('aad'))}"
    if pair.get("aad_unbiased") is not None:
        head += f" (bias-corrected {_fmt(pair['aad_unbiased'])})"
    head += (
        f" [95% CI of the distance between the population means {_fmt(ci[0])}, "
        f"{_fmt(ci[1])}], {_fmt(ratio)}× the AAD of random splits"
    )
    if p is not None and float(p) < alpha:
        return (
            f"{head}; p = {fmt_p(p)}: the cohorts' mean latent vectors differ more than chance "
            f"allows, so the encoder sees a systematic difference between {a} and {b}."
        )
    return (
        f"{head}; p = {fmt_p(p)}: no evidence that the mean latent vectors differ. This does not "
        "show the cohorts are alike: AAD cannot see a change of spread with equal means."
    )


def interpret_pair(pair: Mapping, alpha: float, n_pairs: int) -> str:
    """A plain-language reading of one pair's numbers, including what AAD cannot see.

    Moved here from ``aad_med.distances.compare`` (distances returns numbers only); the name
    and arguments are unchanged.
    """
    a, b = pair["a"], pair["b"]
    lo, hi = pair.get("aad_ci95") or [None, None]
    n_perm = pair.get("n_permutations")
    p_used = pair.get("aad_p_fdr") if n_pairs > 1 else pair.get("aad_p")
    head = f"{a} vs {b}: AAD {_fmt(pair.get('aad'))}"
    if pair.get("aad_unbiased") is not None:
        head += f" (bias-corrected {_fmt(pair['aad_unbiased'])})"
    head += (
        f"; the distance between the population means is between {_fmt(lo)} and {_fmt(hi)} (95% CI)"
    )
    ratio = pair.get("aad_null_ratio")
    if ratio is not None:
        head += (
            f"; AAD is {_fmt(ratio, 2)}x the AAD expected from label shuffles alone "
            f"({_fmt(pair.get('aad_null_median'))})"
        )
    p = pair.get("aad_p")
    if p is None:
        p_text = "permutation p = n/a"
    elif n_perm and p <= 1.0 / (n_perm + 1) + 1e-15:
        p_text = (
            f"permutation p ≤ {_fmt(p, 2)} (no shuffle out of {n_perm} reached the observed AAD)"
        )
    else:
        p_text = f"permutation p = {_fmt(p, 2)}"
    if n_pairs > 1:
        p_text += f", FDR-adjusted across {n_pairs} pairs {_fmt(pair.get('aad_p_fdr'), 2)}"
    if p_used is not None and p_used < alpha:
        verdict = f"the cohort means differ ({p_text})."
    else:
        verdict = f"no evidence at α = {alpha:g} that the cohort means differ ({p_text})."
    parts = [head + ";", verdict]
    std = pair.get("aad_standardized")
    if std is not None:
        parts.append(
            f"Bias-corrected standardised distance {_fmt(std, 2)} (root of the summed squared "
            "per-dimension Cohen's d; 0 is what equal means give most often)."
        )
    extra = [
        f"{label} p = {_fmt(pair[key], 2)}"
        for key, label in (("energy_p", "energy"), ("mmd_p", "MMD"))
        if pair.get(key) is not None
    ]
    blind = (
        "AAD compares only the means: cohorts with equal means but different spread or shape "
        "look identical to it"
    )
    if extra:
        dist_sig = any(pair.get(k) is not None and pair[k] < alpha for k in ("energy_p", "mmd_p"))
        mean_sig = p_used is not None and p_used < alpha
        if dist_sig and not mean_sig:
            blind += (
                f"; here the whole distributions do differ ({', '.join(extra)}), "
                "so look beyond the means"
            )
        elif dist_sig:
            blind += f"; the distribution tests agree ({', '.join(extra)})"
        else:
            blind += f"; the distribution tests see no difference either ({', '.join(extra)})"
    else:
        blind += "; run the energy or MMD tests to check spread and shape"
    parts.append(blind + ".")
    return " ".join(parts)


def latent_sentence(pair: Mapping, alpha: float = ALPHA) -> str | None:
    """What the seed's latent AAD says about a pair, when the statistics used other features."""
    if pair.get("latent_aad") is None:
        return None
    ci = pair.get("latent_aad_ci95") or [None, None]
    p = pair.get("latent_aad_p_fdr", pair.get("latent_aad_p"))
    verdict = (
        "the mean latent vectors differ more than chance allows"
        if p is not None and float(p) < alpha
        else "no evidence that the mean latent vectors differ (the mean latent is blind to most "
        "scanner and protocol differences)"
    )
    corrected = (
        f" (bias-corrected {_fmt(pair['latent_aad_unbiased'])})"
        if pair.get("latent_aad_unbiased") is not None
        else ""
    )
    return (
        f"The seed's latent AAD (mean of patch latents) is {_fmt(pair['latent_aad'])}{corrected} "
        f"[95% CI {_fmt(ci[0])}, {_fmt(ci[1])}], {_fmt(pair.get('latent_aad_null_ratio'))}× its "
        f"null median, p = {fmt_p(p)}: {verdict}."
    )


def calibration_intro(equivalent: Mapping, calibration: Mapping | None = None) -> str:
    """The sentence before a pair's equivalent severities (``pair["equivalent_severity"]``)."""
    which = (
        "the seed's latent AAD"
        if equivalent.get("statistic") == "latent_aad"
        else f"the AAD ({equivalent.get('features', '?')} features)"
    )
    source = f" `{calibration['path']}`" if calibration and calibration.get("path") else ""
    return (
        f"The calibration{source} measured this encoder's AAD between clean reference subjects "
        "and reference subjects carrying one artefact at graded severities. Against it, "
        f"{which} of {_fmt(equivalent.get('value'))} with about "
        f"{_fmt(equivalent.get('n_per_cohort'))} subjects per cohort is comparable to:"
    )


def overlap_warning(cohorts: Mapping[str, Mapping]) -> str | None:
    """The loud warning when subjects used for training are among the compared ones."""
    hits = {
        name: int(info.get("train_overlap") or 0)
        for name, info in cohorts.items()
        if int(info.get("train_overlap") or 0) > 0
    }
    if not hits:
        return None
    parts = ", ".join(
        f"{n} of {cohorts[name].get('n_subjects', '?')} subjects of {name}"
        for name, n in hits.items()
    )
    return (
        f"TRAINING SUBJECTS ARE BEING COMPARED: {parts} were used to train this encoder. "
        "The encoder has seen them, so their latent vectors are not representative of new "
        "data and the tests are over-sensitive (p-values too small, AAD inflated). Compare "
        "cohorts held out from training, or train the encoder on a separate cohort."
    )


def provenance_paragraph(prov: Mapping | None) -> str | None:
    """One sentence saying what made the result (``provenance`` of distances.json), or ``None``
    for a result without it."""
    if not prov:
        return None
    versions = prov.get("versions") or {}
    libs = ", ".join(
        f"{label} {versions[key]}"
        for key, label in (("torch", "torch"), ("monai", "MONAI"), ("numpy", "numpy"))
        if versions.get(key)
    )
    ckpts = "; ".join(
        f"`{Path(str(c.get('path', '?'))).name}` SHA-256 `{c.get('sha256') or '?'}`"
        for c in prov.get("checkpoints") or []
    )
    text = f"Made with aad-med {prov.get('aad_med', '?')}" + (f" ({libs})" if libs else "")
    if prov.get("command"):
        text += f" by `{prov['command']}`"
    return text + (f"; checkpoint {ckpts}." if ckpts else ".")


SUBJECT_DEFINITIONS: dict[str, str] = {
    "role": "'reference' for the subjects of the reference cohort (scored leave-one-out: "
    "against the other reference subjects), 'test' for every other cohort's subjects (scored "
    "against the whole reference).",
    "atypicality": "How far the subject's feature vector (the comparison's features, "
    "standardised over all compared subjects) lies from the reference subjects: with method "
    "knn, the mean squared distance to its k nearest reference subjects.",
    "atypicality_p": "Conformal p-value: the share of reference subjects whose leave-one-out "
    "score is at least the subject's, (1 + count)/(n_ref + 1) for a test subject. A subject "
    "like the reference has p ≤ α with probability at most α, so at α = 0.05 about 1 clean "
    "subject in 20 is flagged by chance. It cannot go below 1/(n_ref + 1).",
    "atypicality_q": "atypicality_p adjusted within the subject's cohort (Benjamini-Hochberg): "
    "flag subjects with q ≤ 0.05 to keep the expected share of false flags among them at 5%.",
    "atypicality_p_tail": "atypicality_p refined beyond the reference's most atypical subject "
    "by a lognormal tail fitted to the leave-one-out scores (equal to atypicality_p wherever "
    "that is above 1/(n_ref + 1)); below 1/(n_ref + 1) it is calibrated only as well as the "
    "tail fits (BENCHMARKS.md, 'Atypical subjects'). atypicality_q_tail is its BH q-value.",
    "intensity_atypicality": "The same score on the intensity fingerprint (per-channel "
    "foreground percentiles of the raw images), with intensity_p and intensity_q its conformal "
    "p-value and q-value: sees gain, contrast and bias differences the encoder's normalised "
    "input hides.",
    "top_block": "The feature block (e.g. multiscale or texture) contributing most to the "
    "score; top_block_share is its share of the score (the blocks' contributions add up to it).",
    "top_channel": "The MRI channel (t1, t1ce, t2, flair) contributing most to "
    "intensity_atypicality.",
    "top_dims": "The three feature dimensions (block[index]) contributing most to the score.",
    "image quality": "MRIQC-style image-quality metrics per channel on the raw images "
    "(aad_med/data/quality.py says exactly how each is computed): snr_csf/gm/wm/total "
    "(higher is better), cnr (higher is better), cjv (lower is better), efc, inu_range (bias "
    "field spread; larger is worse), fber (undefined on skull-stripped data: empty), wm2max.",
}
"""Definitions of the ``subjects.csv`` columns (the report's "Which subjects are different")."""

SUBJECTS_INTRO = (
    "Every subject of every cohort is scored against the reference cohort `{reference}` "
    "({n_reference} subjects; reference subjects leave-one-out) on the comparison's features "
    "and on the intensity fingerprint. subjects.csv holds one row per subject, with its image-"
    "quality metrics. p-values are conformal (rank among the reference's leave-one-out "
    "scores), so a subject like the reference gets p ≤ 0.05 with probability at most 0.05; "
    "q-values are Benjamini-Hochberg within each cohort."
)

DRIFT_EXPLANATION = (
    "Each batch against the reference `{reference}`, in the order given: the AAD with its 95% "
    "CI and permutation p-value, and how many of the batch's subjects have atypicality_p ≤ "
    "0.05 (about 5% by chance). A rising AAD over batches is drift away from the reference."
)

_METRIC_WORDS = {"knn": "nearest reference subjects", "mahalanobis": "reference mean"}


def subject_reason(row: Mapping, reference: str) -> str:
    """Why one subject is (or is not) atypical, in words, from its ``subjects.csv`` row."""
    p = row.get("atypicality_p_tail")
    if p is None or p != p:
        p = row.get("atypicality_p")
    where = "the other reference subjects" if row.get("role") == "reference" else reference
    if p is not None and p <= ALPHA:
        head = f"Its features are further from {where} than almost every reference subject's"
    else:
        head = f"Its features lie within the range of {where}"
    head += f" (p = {fmt_p(p)})"
    share = row.get("top_block_share")
    if row.get("top_block") and share is not None and share == share:
        head += f"; {100 * float(share):.0f}% of the score comes from the {row['top_block']} block"
        if row.get("top_dims"):
            head += f" (largest dimensions {str(row['top_dims']).replace(';', ', ')})"
    ip = row.get("intensity_p")
    if ip is not None and ip == ip:
        if ip <= ALPHA:
            head += (
                f". Its raw intensities are atypical too (p = {fmt_p(ip)}), mostly in "
                f"{str(row.get('top_channel', '?')).upper()}"
            )
        else:
            head += f". Its raw intensities are typical (p = {fmt_p(ip)})"
    return head + "."


def drift_sentence(points: list[Mapping], reference: str) -> str:
    """The drift section's reading of the per-batch AADs against the reference."""
    if not points:
        return f"No batch was compared with {reference}."
    sig = [pt["batch"] for pt in points if pt.get("aad_p") is not None and pt["aad_p"] < ALPHA]
    text = DRIFT_EXPLANATION.format(reference=reference)
    if sig:
        text += f" Batches whose AAD p < {ALPHA:g}: {', '.join(sig)}."
    else:
        text += f" No batch differs from the reference at p < {ALPHA:g}."
    return text
