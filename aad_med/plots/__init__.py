"""Stage 6a, plots: headless matplotlib figures, one function per figure, each writing one file.
Computes no statistics: it draws what ``distances`` returned."""
