"""Models and data shared by the benchmark scripts (scikit-learn digits: no
download)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits


def digits(split=1347):
    """`(train_x, train_y), (test_x, test_y)`: 8x8 digits in [0, 1], shuffled."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    images = jnp.asarray(data.data[order] / 16.0, jnp.float32)
    labels = jnp.asarray(data.target[order])
    return (images[:split], labels[:split]), (images[split:], labels[split:])


class Autoencoder(eqx.Module):
    """Martens' (2010) deep autoencoder shape: tanh between Linear layers."""

    layers: list

    def __init__(self, sizes, key):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            eqx.nn.Linear(a, b, key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


AUTOENCODER_SIZES = [64, 128, 64, 32, 8, 32, 64, 128, 64]
