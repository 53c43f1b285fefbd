"""Seeing what the student learned: attention maps, rollout, affinity, their figures, the callback drawing them."""
