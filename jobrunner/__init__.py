"""jobrunner: offline batch captioning of image datasets with Phi-3-Vision on MLX.

Stages (one module each): ``spec`` (job spec and fingerprint) → ``readers`` (rows) →
``batching`` (length-sorted batches) → the model → ``writers`` / ``checkpoint`` (durable parts).
"""

__version__ = "0.1.0"
