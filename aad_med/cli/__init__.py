"""Stage 7, command-line entry points: parse configuration, call the stages, report errors.
Thin on purpose: no logic here that a script or notebook could not reach through the API."""
