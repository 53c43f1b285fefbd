"""Step 1 and everything about the teacher: its training, step 2's frozen teacher, ensembles, the output cache."""
