"""Command-line entry points: parse the command line, call the body in :mod:`aad_med.pipelines`
or a stage, report errors in one line.
Thin on purpose: no logic here that a script or notebook could not reach through the API."""
