"""Cohort discovery: every layout written by tests/nifti_factory.py (not the project's generator),
and every discovery-level problem as one line naming the folder or file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from nifti_factory import (
    brain_like,
    brats_id,
    tumour_like,
    write_brats_cohort,
    write_brats_subject,
    write_csv_cohort,
    write_csv_manifest,
    write_msd_cohort,
    write_nifti,
)

from aad_med import CHANNELS
from aad_med.data.layouts import LAYOUTS, discover_cohort
from aad_med.errors import CohortError

SUFFIX = {
    "brats2021": {"t1": "_t1.nii.gz", "t1ce": "_t1ce.nii.gz", "t2": "_t2.nii.gz",
                  "flair": "_flair.nii.gz", "seg": "_seg.nii.gz"},
    "brats2020": {"t1": "_t1.nii", "t1ce": "_t1ce.nii", "t2": "_t2.nii", "flair": "_flair.nii",
                  "seg": "_seg.nii"},
    "brats2023": {"t1": "-t1n.nii.gz", "t1ce": "-t1c.nii.gz", "t2": "-t2w.nii.gz",
                  "flair": "-t2f.nii.gz", "seg": "-seg.nii.gz"},
}  # fmt: skip


def problems_of(path, **kw) -> list[str]:
    with pytest.raises(CohortError) as ei:
        discover_cohort(path, **kw)
    return ei.value.problems


def test_layout_names():
    assert LAYOUTS == ("brats2021", "brats2020", "brats2023", "msd", "csv")


@pytest.mark.parametrize("layout", ["brats2021", "brats2020", "brats2023"])
def test_brats_layouts_map_files_to_canonical_channels(tmp_path, layout):
    # Written in reverse order: discovery must sort by ID, not trust the file system.
    for i in (2, 0, 1):
        write_brats_subject(tmp_path, brats_id(layout, i), layout=layout, seed=i)
    cohort = discover_cohort(tmp_path)
    assert cohort.layout == layout
    assert cohort.path == tmp_path
    assert cohort.subject_ids == [brats_id(layout, i) for i in range(3)]
    assert cohort.n_with_seg == 3 and cohort.skipped == []
    for s in cohort.subjects:
        assert set(s.images) == set(CHANNELS)
        for ch in CHANNELS:
            assert (
                s.images[ch].path == tmp_path / s.subject_id / f"{s.subject_id}{SUFFIX[layout][ch]}"
            )
            assert s.images[ch].volume is None
        assert s.seg.path.name == f"{s.subject_id}{SUFFIX[layout]['seg']}"


def test_brats2020_validation_subjects_without_seg(tmp_path):
    write_brats_subject(tmp_path, "BraTS20_Validation_001", layout="brats2020", with_seg=False)
    write_brats_subject(tmp_path, "BraTS20_Validation_002", layout="brats2020", with_seg=False)
    cohort = discover_cohort(tmp_path)
    assert cohort.layout == "brats2020"
    assert cohort.n_with_seg == 0
    assert all(s.seg is None for s in cohort.subjects)


def test_brats2020_misnamed_seg_is_tolerated(tmp_path):
    # Real release: BraTS20_Training_355 ships its seg as W39_1998.09.19_Segm.nii.
    write_brats_cohort(tmp_path, n=2, layout="brats2020")
    folder = write_brats_subject(tmp_path, "BraTS20_Training_355", layout="brats2020")
    (folder / "BraTS20_Training_355_seg.nii").rename(folder / "W39_1998.09.19_Segm.nii")
    cohort = discover_cohort(tmp_path)
    s = {r.subject_id: r for r in cohort.subjects}["BraTS20_Training_355"]
    assert s.seg.path.name == "W39_1998.09.19_Segm.nii"
    assert cohort.n_with_seg == 3


def test_two_seg_like_files_are_ambiguous(tmp_path):
    folder = write_brats_subject(tmp_path, "BraTS20_Training_355", layout="brats2020")
    (folder / "BraTS20_Training_355_seg.nii").rename(folder / "W39_Segm.nii")
    shutil.copy(folder / "W39_Segm.nii", folder / "old_segmentation.nii")
    (line,) = problems_of(tmp_path)
    assert line.startswith(f"{folder}: ambiguous segmentation")
    assert "W39_Segm.nii" in line and "old_segmentation.nii" in line


def test_brats_file_names_match_case_insensitively(tmp_path):
    folder = write_brats_subject(tmp_path, "BraTS2021_00007")
    for f in folder.iterdir():
        f.rename(f.with_name(f.name.replace("_flair", "_FLAIR").replace("_t1ce", "_T1CE")))
    (s,) = discover_cohort(tmp_path).subjects
    assert s.images["flair"].path.name == "BraTS2021_00007_FLAIR.nii.gz"
    assert s.images["t1ce"].path.name == "BraTS2021_00007_T1CE.nii.gz"
    assert s.images["t1"].path.name == "BraTS2021_00007_t1.nii.gz"


def test_one_subject_cohort_is_discovered(tmp_path):
    write_brats_subject(tmp_path, "BraTS2021_00001")
    assert discover_cohort(tmp_path).subject_ids == ["BraTS2021_00001"]


def test_kaggle_nesting_is_followed(tmp_path):
    inner = tmp_path / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    write_brats_cohort(inner, n=2, layout="brats2020")
    # The Kaggle release also ships CSV sheets next to the subject folders.
    (inner / "name_mapping.csv").write_text(
        "Grade,BraTS_2020_subject_ID\nHGG,BraTS20_Training_001\n"
    )
    cohort = discover_cohort(tmp_path)
    assert cohort.path == inner and cohort.layout == "brats2020" and len(cohort.subjects) == 2


def test_msd_4d_default_order_without_dataset_json(tmp_path):
    write_msd_cohort(tmp_path, n=2, dataset_json=False)
    cohort = discover_cohort(tmp_path)
    assert cohort.layout == "msd"
    assert cohort.subject_ids == ["BRATS_001", "BRATS_002"]
    s = cohort.subjects[0]
    # Task01 order: FLAIR, T1w, T1gd, T2w.
    assert {ch: s.images[ch].volume for ch in CHANNELS} == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
    assert {src.path for src in s.images.values()} == {tmp_path / "imagesTr" / "BRATS_001.nii.gz"}
    assert s.seg.path == tmp_path / "labelsTr" / "BRATS_001.nii.gz"


def test_msd_order_comes_from_dataset_json(tmp_path):
    order = ("t2", "flair", "t1", "t1ce")
    write_msd_cohort(tmp_path, n=1, order=order)
    assert json.loads((tmp_path / "dataset.json").read_text())["modality"]["0"] == "T2w"
    (s,) = discover_cohort(tmp_path).subjects
    assert {ch: s.images[ch].volume for ch in CHANNELS} == {ch: order.index(ch) for ch in CHANNELS}


def test_msd_without_labels_and_hidden_forks(tmp_path):
    write_msd_cohort(tmp_path, n=2, with_labels=False)
    # The Decathlon tarball carries macOS "._" forks; they are not subjects.
    (tmp_path / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\0\5\26\7")
    cohort = discover_cohort(tmp_path)
    assert cohort.subject_ids == ["BRATS_001", "BRATS_002"] and cohort.n_with_seg == 0


def test_nnunet_split_channels(tmp_path):
    order = ("t1", "t1ce", "t2", "flair")
    write_msd_cohort(tmp_path, n=2, split_channels=True, order=order)
    cohort = discover_cohort(tmp_path)
    assert cohort.layout == "msd"
    s = cohort.subjects[1]
    assert s.images["flair"].path.name == "BRATS_002_0003.nii.gz"
    assert s.images["flair"].volume is None


def test_msd_dataset_json_with_unknown_modalities(tmp_path):
    write_msd_cohort(tmp_path, n=1)
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT", "1": "PET"}}))
    (line,) = problems_of(tmp_path)
    assert line.startswith(f"{tmp_path / 'dataset.json'}: modalities")
    assert "CT" in line


def test_msd_dataset_json_not_json(tmp_path):
    write_msd_cohort(tmp_path, n=1)
    (tmp_path / "dataset.json").write_text("{not json")
    (line,) = problems_of(tmp_path)
    assert line.startswith(f"{tmp_path / 'dataset.json'}: not readable JSON")


def test_msd_label_without_image(tmp_path):
    write_msd_cohort(tmp_path, n=2)
    (tmp_path / "imagesTr" / "BRATS_002.nii.gz").unlink()
    (line,) = problems_of(tmp_path)
    assert line.startswith(str(tmp_path / "labelsTr" / "BRATS_002.nii.gz"))


def test_csv_manifest_relative_paths(tmp_path):
    csv_path = write_csv_cohort(tmp_path / "site", n=3)
    cohort = discover_cohort(csv_path)
    assert cohort.layout == "csv" and cohort.path == csv_path
    assert cohort.subject_ids == ["case00", "case01", "case02"]
    s = cohort.subjects[2]
    assert s.images["t2"].path == tmp_path / "site" / "images" / "case02_t2_scan.nii.gz"
    assert s.seg.path == tmp_path / "site" / "images" / "case02_label.nii.gz"


def test_csv_manifest_found_in_folder(tmp_path):
    csv_path = write_csv_cohort(tmp_path, n=2)
    cohort = discover_cohort(tmp_path)
    assert cohort.layout == "csv" and cohort.path == csv_path and len(cohort.subjects) == 2


def test_csv_optional_seg_and_absolute_paths(tmp_path):
    img = write_nifti(tmp_path / "abs" / "a.nii.gz", brain_like())
    rows = [{"subject_id": "s1", **{ch: str(img) for ch in CHANNELS}}]
    csv_path = write_csv_manifest(tmp_path / "m.csv", rows)
    (s,) = discover_cohort(csv_path).subjects
    assert s.seg is None and s.images["t1"].path == img


def test_csv_missing_columns(tmp_path):
    csv_path = write_csv_manifest(
        tmp_path / "m.csv", [{"subject_id": "a", "t1": "x.nii"}], columns=("subject_id", "t1")
    )
    (line,) = problems_of(csv_path)
    assert line.startswith(f"{csv_path}: manifest lacks column(s) t1ce, t2, flair")


def test_csv_missing_paths_all_reported(tmp_path):
    img = write_nifti(tmp_path / "ok.nii.gz", brain_like())
    rows = [
        {"subject_id": "a", "t1": "ok.nii.gz", "t1ce": "gone.nii.gz", "t2": "ok.nii.gz",
         "flair": "ok.nii.gz"},
        {"subject_id": "b", "t1": "ok.nii.gz", "t1ce": "ok.nii.gz", "t2": "ok.nii.gz",
         "flair": "", "seg": "noseg.nii.gz"},
    ]  # fmt: skip
    csv_path = write_csv_manifest(tmp_path / "m.csv", rows)
    lines = problems_of(csv_path)
    assert len(lines) == 3
    assert (
        lines[0] == f"{csv_path}: line 2 (a): t1ce file {tmp_path / 'gone.nii.gz'} does not exist"
    )
    assert any("line 3 (b): missing modality flair" in x for x in lines)
    assert any(f"seg file {tmp_path / 'noseg.nii.gz'} does not exist" in x for x in lines)
    assert img.exists()


def test_csv_duplicate_subject_ids(tmp_path):
    img = write_nifti(tmp_path / "ok.nii.gz", brain_like())
    row = {"subject_id": "dup", **{ch: img.name for ch in CHANNELS}}
    csv_path = write_csv_manifest(tmp_path / "m.csv", [row, row, {**row, "subject_id": "x"}])
    assert problems_of(csv_path) == [f"{csv_path}: duplicate subject ID 'dup' (2 entries)"]


def test_csv_header_only_is_empty_cohort(tmp_path):
    csv_path = write_csv_manifest(tmp_path / "m.csv", [])
    (line,) = problems_of(csv_path)
    assert line.startswith(f"{csv_path}: empty cohort")


def test_copied_subject_folder_is_a_duplicate(tmp_path):
    write_brats_cohort(tmp_path, n=2)
    shutil.copytree(tmp_path / "BraTS2021_00001", tmp_path / "BraTS2021_00001 (copy)")
    (line,) = problems_of(tmp_path)
    assert line.startswith(f"{tmp_path / 'BraTS2021_00001 (copy)'}: duplicate subject ID")
    assert "'BraTS2021_00001'" in line


def test_missing_modality_names_folder_and_channel(tmp_path):
    write_brats_cohort(tmp_path, n=3)
    (tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz").unlink()
    (tmp_path / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz").unlink()
    lines = problems_of(tmp_path)
    assert lines == [
        f"{tmp_path / 'BraTS2021_00001'}: missing modality t1ce (no file named *_t1ce.nii[.gz])",
        f"{tmp_path / 'BraTS2021_00002'}: missing modality flair (no file named *_flair.nii[.gz])",
    ]


def test_missing_brats2023_modality_names_its_release_suffix(tmp_path):
    folder = write_brats_subject(tmp_path, "BraTS-MEN-00001-000", layout="brats2023")
    (folder / "BraTS-MEN-00001-000-t2f.nii.gz").unlink()
    (line,) = problems_of(tmp_path)
    assert line == f"{folder}: missing modality flair (no file named *_t2f.nii[.gz])"


def test_skip_invalid_leaves_out_subject_with_missing_modality(tmp_path):
    write_brats_cohort(tmp_path, n=3)
    (tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz").unlink()
    cohort = discover_cohort(tmp_path, skip_invalid=True)
    assert cohort.subject_ids == ["BraTS2021_00000", "BraTS2021_00002"]
    assert len(cohort.skipped) == 1 and "BraTS2021_00001: missing modality t2" in cohort.skipped[0]


def test_skip_invalid_with_nothing_left_still_fails(tmp_path):
    write_brats_cohort(tmp_path, n=1)
    (tmp_path / "BraTS2021_00000" / "BraTS2021_00000_t2.nii.gz").unlink()
    lines = problems_of(tmp_path, skip_invalid=True)
    assert lines[-1] == f"{tmp_path}: no valid subject left after skipping"


def test_folder_of_unnamed_nifti_among_subjects_is_reported(tmp_path):
    write_brats_cohort(tmp_path, n=2)
    write_nifti(tmp_path / "scans_from_pacs" / "image1.nii.gz", brain_like())
    (line,) = problems_of(tmp_path)
    assert line.startswith(f"{tmp_path / 'scans_from_pacs'}: no file named like a BraTS modality")


def test_empty_folder_is_an_empty_cohort(tmp_path):
    assert problems_of(tmp_path) == [f"{tmp_path}: empty cohort (the folder is empty)"]


def test_empty_imagestr_is_an_empty_cohort(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (line,) = problems_of(tmp_path)
    assert line.startswith(f"{tmp_path / 'imagesTr'}: empty cohort")


def test_unknown_layout_says_what_was_tried(tmp_path):
    write_nifti(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz", brain_like())
    (tmp_path / "notes.txt").write_text("BIDS, not BraTS")
    (line,) = problems_of(tmp_path)
    assert line.startswith(
        f"{tmp_path}: no known layout matched; tried brats2021, brats2020, brats2023, msd, csv:"
    )
    for why in ("brats2023:", "msd: no imagesTr/", "csv: no .csv manifest"):
        assert why in line


def test_nifti_files_at_top_level_are_unknown_layout(tmp_path):
    write_nifti(tmp_path / "a_t1.nii.gz", brain_like())
    (line,) = problems_of(tmp_path)
    assert "no known layout matched" in line and "1 NIfTI files lie directly" in line


@pytest.mark.parametrize(
    ("first", "second"), [("brats2021", "brats2023"), ("brats2020", "brats2021")]
)
def test_mixed_brats_layouts(tmp_path, first, second):
    write_brats_subject(tmp_path, brats_id(first, 1), layout=first)
    write_brats_subject(tmp_path, brats_id(second, 2), layout=second)
    (line,) = problems_of(tmp_path)
    assert line.startswith(f"{tmp_path}: cohort mixes layouts")
    assert f"{first} (1 subject, e.g. {brats_id(first, 1)})" in line
    assert f"{second} (1 subject, e.g. {brats_id(second, 2)})" in line


def test_brats_folders_next_to_decathlon_is_mixed(tmp_path):
    write_msd_cohort(tmp_path, n=1)
    write_brats_subject(tmp_path, "BraTS2021_00001")
    (line,) = problems_of(tmp_path)
    assert "cohort mixes layouts" in line and "msd (1 subject" in line


def test_missing_path_and_single_file(tmp_path):
    assert problems_of(tmp_path / "nope") == [
        f"{tmp_path / 'nope'}: cohort folder or CSV manifest does not exist"
    ]
    f = write_nifti(tmp_path / "x.nii.gz", brain_like())
    (line,) = problems_of(f)
    assert line.startswith(f"{f}: is a single NIfTI file")


def test_discovery_reads_no_voxel(tmp_path, monkeypatch):
    write_brats_cohort(tmp_path, n=2)
    import nibabel

    def boom(*a, **k):
        raise AssertionError("discovery must not open images")

    monkeypatch.setattr(nibabel, "load", boom)
    assert len(discover_cohort(tmp_path).subjects) == 2


def test_seg_labels_of_factory_are_brats(tmp_path):
    # Guards the fixtures the validation tests rely on.
    assert set(np.unique(tumour_like())) == {0, 1, 2, 4}
