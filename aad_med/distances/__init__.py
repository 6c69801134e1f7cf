"""Stage 5, distances: AAD and its statistics (permutation p-values, bootstrap intervals,
effect sizes, complementary tests, attribution). Pure numpy/scipy on arrays: never touches files."""
