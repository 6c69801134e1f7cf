"""The provenance block: versions from the installed distributions, the command line and the
checkpoints' SHA-256, as distances.json, calibration.json and the report record it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aad_med
from aad_med.provenance import command_line, package_version, provenance
from aad_med.report.text import provenance_paragraph


def test_provenance_block(tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    prov = provenance(ckpt, argv=["/usr/bin/aad-compare", "checkpoint=a b.pt", "seed=1"])
    assert prov["aad_med"] == aad_med.__version__
    assert prov["versions"]["numpy"] == package_version("numpy") is not None
    assert set(prov["versions"]) == {"python", "torch", "monai", "numpy"}
    assert prov["command"] == "aad-compare 'checkpoint=a b.pt' seed=1"
    assert prov["checkpoints"] == [
        {"path": str(ckpt.resolve()), "sha256": hashlib.sha256(b"weights").hexdigest()}
    ]
    assert provenance(None, argv=["x"])["checkpoints"] == []
    assert package_version("surely-not-an-installed-distribution") is None
    assert command_line(["/a/b/prog"]) == "prog"
    cli = Path(aad_med.__file__).parent / "cli" / "compare.py"
    assert command_line([str(cli), "seed=0"]) == "python -m aad_med.cli.compare seed=0"


def test_report_sentence_names_versions_command_and_hash(tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    text = provenance_paragraph(provenance(ckpt, argv=["aad-compare", "seed=0"]))
    assert text.startswith(f"Made with aad-med {aad_med.__version__} (torch ")
    assert "`aad-compare seed=0`" in text and hashlib.sha256(b"weights").hexdigest() in text
    assert provenance_paragraph(None) is None
