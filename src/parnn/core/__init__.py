"""core: the readable math, written once.

    model.py   Spec, the ONE flat parameter buffer and its per-layer views, the network (MLP):
               a walk over its layers, then the output activation and loss
    layers.py  layer kinds (Dense), each with its forward and backward side by side, over its
               slice of the flat buffer; the activations and their derivatives
    losses.py  each loss's value and output delta side by side
    optim.py   optimizers, one step on flat buffers (Adam's is one pass compiled by Numba)
    jit.py     `compiled`: the few loops of core that Numba compiles on their first call

Imports nothing of parnn but parnn.errors: every other ring builds on this one. Numba is imported
only when a compiled loop first runs (Adam's step, ReLU's derivative, softmax), so
`import parnn.core` stays light.
"""
