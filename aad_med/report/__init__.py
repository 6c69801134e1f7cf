"""Stage 6b, report: writers only. ``distances.json``, CSV and NIfTI files (``serialize``), and
``report.md`` / a self-contained ``report.html`` (``document``) that say in words what each
number means; ``text`` is the one place that prose lives. What to compute and in which order is
:mod:`aad_med.pipelines.compare`'s job."""
