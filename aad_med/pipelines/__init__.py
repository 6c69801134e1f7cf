"""The applications: one module per command, each holding that command's body as a plain
function over a settings object (``compare.run_comparison``, ``train.train_from_config``,
``calibrate.calibrate``). They order the stages (data, embedding, distances, calibration, plots,
report) and stage the run folder; parsing the command line is :mod:`aad_med.cli`'s job, and no
stage imports from here."""
