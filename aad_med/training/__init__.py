"""Stage 3, training: the plain-PyTorch training loop, atomic checkpoints with exact resume,
and distributed (torchrun/DDP) helpers. Configuration arrives as plain objects from
:mod:`aad_med.pipelines.train` (which orders a whole training run)."""
