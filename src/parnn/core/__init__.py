"""core: the readable math. A Spec, the ONE flat parameter buffer with per-layer views, each layer
kind's forward/backward side by side, losses and optimizers (one step on flat buffers).

Imports nothing of parnn but parnn.errors: every other ring builds on this one.
"""
