"""parnn: parallel training of feedforward neural networks on Fashion-MNIST."""

__version__ = "0.1.0"
