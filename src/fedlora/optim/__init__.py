"""Local optimizers beyond torch's: each acts on the privatised gradient only (post-processing)."""
