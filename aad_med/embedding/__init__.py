"""Stage 4, embedding: encode every subject of a cohort to one vector (streamed, cached).
Knows the model and the evaluation patch grid; computes no statistics."""
