"""The Hydra configs of aad-med, shipped in the wheel as the package ``aad_med.configs`` (see
``aad_med/resources.py``). Only YAML lives here."""
