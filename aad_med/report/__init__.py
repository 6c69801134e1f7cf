"""Stage 6b, report: ``distances.json``, ``report.md`` and a self-contained ``report.html``
that say in words what each number means."""
