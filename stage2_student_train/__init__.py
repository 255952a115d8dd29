"""Stage 2: cache -> student (+ projector and router) training, eval, checkpoints."""
