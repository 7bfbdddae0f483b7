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


def curve_images(control, size):
    """Images `(n, size * size)` in [0, 1] of the quadratic Bezier curves with
    control points `control` `(n, 3, 2)`: a Gaussian blob (standard deviation
    0.6 pixels) at 32 points along each curve, the intensity the maximum over
    the blobs."""
    t = np.linspace(0, 1, 32)[None, :, None]
    points = (
        (1 - t) ** 2 * control[:, :1]
        + 2 * t * (1 - t) * control[:, 1:2]
        + t**2 * control[:, 2:]
    )  # (n, 32, 2)
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), -1)
    distance = np.sum(
        (grid.reshape(1, 1, -1, 2) - points[:, :, None, :]) ** 2, -1
    )  # (n, 32, size * size)
    return np.max(np.exp(-distance / (2 * 0.6**2)), 1).astype(np.float32)


def curves(num_train=20_000, num_valid=2_000, size=8, seed=0):
    """`train, valid`: generated `size x size` images, flattened, of random
    quadratic Bezier curves (`curve_images`), after the CURVES data of Hinton
    and Salakhutdinov (2006) that Martens (2010) trains the deep autoencoder on.
    Each image draws three control points uniformly in the grid. Made here,
    from `seed`: as many images as asked, no download."""
    rng = np.random.default_rng(seed)
    images = curve_images(rng.uniform(0, size - 1, (num_train + num_valid, 3, 2)), size)
    return jnp.asarray(images[:num_train]), jnp.asarray(images[num_train:])


def curve_classes(num_train=60_000, num_valid=10_000, size=8, seed=1):
    """`(train_x, train_y), (valid_x, valid_y)`: the images of `curves` with
    one of 10 labels: the direction of the chord from the first control point
    to the last, taken modulo 180 degrees (a curve has no start) and cut into 5
    equal sectors, times the side of the chord that the curve bends to. A
    classifier must find both from the pixels, and curves near a sector's edge
    or nearly straight are ambiguous at 8x8, so the error falls for as long as
    it trains, and the training images are too many to learn by heart within
    the benchmark's budget."""
    rng = np.random.default_rng(seed)
    control = rng.uniform(0, size - 1, (num_train + num_valid, 3, 2))
    chord = control[:, 2] - control[:, 0]
    angle = np.arctan2(chord[:, 1], chord[:, 0])  # in (-pi, pi]
    chord = np.where((angle < 0)[:, None], -chord, chord)  # now in [0, pi]
    bend = control[:, 1] - (control[:, 0] + control[:, 2]) / 2
    side = chord[:, 0] * bend[:, 1] - chord[:, 1] * bend[:, 0] > 0
    sector = np.minimum((angle % np.pi / np.pi * 5).astype(int), 4)
    labels = jnp.asarray(2 * sector + side)
    images = jnp.asarray(curve_images(control, size))
    return (
        (images[:num_train], labels[:num_train]),
        (images[num_train:], labels[num_train:]),
    )


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


def python_text(num_chars=400_000, vocab=96):
    """`(train, valid)` int32 arrays of character ids from the Python standard
    library's own sources (local files: no download). Printable ASCII and the
    newline map to `0..vocab-2`, everything else to `vocab-1`."""
    import os

    root = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    text, size = [], 0
    for name in names:
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            chunk = f.read()
        text.append(chunk)
        size += len(chunk)
        if size >= num_chars:
            break
    codes = np.frombuffer(
        "".join(text)[:num_chars].encode("ascii", "replace"), np.uint8
    )
    ids = np.where(codes == 10, 0, codes.astype(np.int32) - 31)
    ids = np.where((ids >= 0) & (ids < vocab - 1), ids, vocab - 1)
    split = int(0.9 * len(ids))
    return jnp.asarray(ids[:split]), jnp.asarray(ids[split:])


def text_batch(data, key, batch_size, context):
    """`{"input": (B, T), "target": (B, T)}`: random windows and the next chars."""
    starts = jax.random.randint(key, (batch_size,), 0, len(data) - context - 1)
    window = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (context + 1,)))(
        starts
    )
    return {"input": window[:, :-1], "target": window[:, 1:]}


class Block(eqx.Module):
    """Pre-LayerNorm transformer block: self-attention (causal, or over every
    token with `causal=False`), then a GELU MLP."""

    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    causal: bool = eqx.field(static=True)

    def __init__(self, width, heads, key, causal=True):
        k1, k2, k3 = jax.random.split(key, 3)
        self.causal = causal
        self.norm1 = eqx.nn.LayerNorm(width)
        self.attention = eqx.nn.MultiheadAttention(heads, width, key=k1)
        self.norm2 = eqx.nn.LayerNorm(width)
        self.up = eqx.nn.Linear(width, 4 * width, key=k2)
        self.down = eqx.nn.Linear(4 * width, width, key=k3)

    def __call__(self, x):
        t = x.shape[0]
        h = jax.vmap(self.norm1)(x)
        mask = jnp.tril(jnp.ones((t, t), bool)) if self.causal else None
        x = x + self.attention(h, h, h, mask=mask)
        h = jax.vmap(self.norm2)(x)
        return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(h)))


class CharTransformer(eqx.Module):
    """A character-level GPT in the shape of Equinox's BERT example: token and
    position `Embedding`s, `Block`s, a final LayerNorm and a `Linear` head, mapping
    `(T,)` ids to `(T, vocab)` logits."""

    tokens: eqx.nn.Embedding
    positions: eqx.nn.Embedding
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab, width, depth, heads, context, key):
        keys = jax.random.split(key, depth + 3)
        self.tokens = eqx.nn.Embedding(vocab, width, key=keys[0])
        self.positions = eqx.nn.Embedding(context, width, key=keys[1])
        self.blocks = [Block(width, heads, k) for k in keys[3:]]
        self.norm = eqx.nn.LayerNorm(width)
        self.head = eqx.nn.Linear(width, vocab, key=keys[2])

    def __call__(self, ids):
        x = jax.vmap(self.tokens)(ids) + jax.vmap(self.positions)(
            jnp.arange(ids.shape[0])
        )
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(jax.vmap(self.norm)(x))


class PatchTransformer(eqx.Module):
    """A small vision transformer for square images given flattened: `patch x
    patch` patches, each a token through a `Linear` embedding plus a position
    `Embedding`, non-causal `Block`s, a final LayerNorm, the mean over the tokens
    and a `Linear` head to `(classes,)` logits."""

    grid: int = eqx.field(static=True)  # patches per side
    patch: int = eqx.field(static=True)
    embed: eqx.nn.Linear
    positions: eqx.nn.Embedding
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, size, patch, width, depth, heads, classes, key):
        keys = jax.random.split(key, depth + 3)
        self.grid, self.patch = size // patch, patch
        self.embed = eqx.nn.Linear(patch * patch, width, key=keys[0])
        self.positions = eqx.nn.Embedding(self.grid**2, width, key=keys[1])
        self.blocks = [Block(width, heads, k, causal=False) for k in keys[3:]]
        self.norm = eqx.nn.LayerNorm(width)
        self.head = eqx.nn.Linear(width, classes, key=keys[2])

    def __call__(self, pixels):
        n, p = self.grid, self.patch
        patches = pixels.reshape(n, p, n, p).transpose(0, 2, 1, 3).reshape(n * n, p * p)
        x = jax.vmap(self.embed)(patches) + jax.vmap(self.positions)(jnp.arange(n * n))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(jax.vmap(self.norm)(x), 0))
