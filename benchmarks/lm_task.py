"""The task of `train_lm.py` and `paper_table2.py`: the data and the model.

A byte-level decoder-only Transformer (pre-LayerNorm, tied embedding) on the
Python standard library's ``.py`` files, split into train and validation by
file (the CRC32 of a file's path relative to the stdlib, 0 mod 10: validation).
"""

import pathlib
import sysconfig
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

VOCAB = 256  # bytes


# ----------------------------------------------------------------------------- data


def load_stdlib_bytes(max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
  """Train and validation byte streams from the stdlib's .py files, split by file."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
  train, valid = [], []
  n_train = n_valid = 0
  for path in files:
    rel = path.relative_to(root).as_posix()
    try:
      data = path.read_bytes()
    except OSError:
      continue
    if zlib.crc32(rel.encode()) % 10 == 0:
      valid.append(data)
      n_valid += 1
    else:
      train.append(data)
      n_train += 1
  # Files are separated by a NUL byte, which never occurs in source text.
  train_arr = np.frombuffer(b"\0".join(train), np.uint8)
  valid_arr = np.frombuffer(b"\0".join(valid), np.uint8)
  if max_bytes is not None:
    train_arr, valid_arr = train_arr[:max_bytes], valid_arr[: max(max_bytes // 9, 1 << 16)]
  info = {"train_files": n_train, "valid_files": n_valid,
          "train_bytes": int(train_arr.size), "valid_bytes": int(valid_arr.size)}
  return train_arr, valid_arr, info


def sample_batches(data: np.ndarray, n: int, batch: int, seq_len: int, seed: int):
  """`n` batches of random windows (tokens of length seq_len + 1), deterministic."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, data.size - seq_len - 1, size=(n, batch))
  idx = starts[..., None] + np.arange(seq_len + 1)
  return data[idx].astype(np.int32)  # (n, batch, seq_len + 1)


# ---------------------------------------------------------------------------- model


class Block(nnx.Module):
  """Pre-LayerNorm causal self-attention + MLP block."""

  def __init__(self, d_model: int, n_heads: int, rngs: nnx.Rngs):
    self.n_heads = n_heads
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.n_heads
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h).astype(np.float32)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    attn = jax.nn.softmax(scores, axis=-1)
    x = x + self.proj(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Decoder-only byte-level Transformer with tied input/output embedding."""

  def __init__(self, *, d_model: int, layers: int, seq_len: int, n_heads: int, rngs):
    self.embed = nnx.Embed(VOCAB, d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d_model)))
    self.blocks = nnx.List([Block(d_model, n_heads, rngs) for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[: tokens.shape[1]][None]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.ln_f(x))


def loss_fn(model: TransformerLM, batch: jax.Array) -> jax.Array:
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
