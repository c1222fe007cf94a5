"""Writes the notebooks' source cells (run once by developers; the .ipynb files are committed).

    python notebooks/build_notebooks.py && python notebooks/run_notebooks.py

Keeping the cells here makes notebook diffs reviewable; the notebooks import
tgq_jax and never copy code out of it.
"""
import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).parent
REPO_URL = "https://github.com/tgq-jax/tgq-jax"  # where the package is installed from on Colab

INSTALL = f'''# On Colab, install tgq_jax (locally, the checkout's virtual environment already has it).
import importlib.util, subprocess, sys
if importlib.util.find_spec("tgq_jax") is None:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+{REPO_URL}"], check=True)'''


def badge(name):
  return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"(https://colab.research.google.com/github/tgq-jax/tgq-jax/blob/main/notebooks/{name})")


def quickstart():
  cells = [
    new_markdown_cell(f"""# tgq_jax quickstart: the TGA quantizer

{badge("01_quickstart.ipynb")}

TGA (He & Fan, CVPR 2019) ternarizes a weight tensor to `alpha * q`, `q` in {{-1, 0, +1}}, with a
**trainable** threshold `delta`: the scale `alpha` is the closed-form mean of a Gaussian truncated at
the threshold, so back-propagation trains the threshold with the weights. This notebook looks at
the quantizer on one tensor, compares it with TWN and TTQ, and ternarizes one Flax layer."""),
    new_code_cell(INSTALL),
    new_code_cell('''import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from tgq_jax import ternarize
from tgq_jax.quantizers import get_quantizer

print("jax", jax.__version__, "devices:", jax.devices())'''),
    new_markdown_cell("""## One Gaussian weight tensor
A 3x3 conv kernel with 64 input and 64 output channels, Flax layout (HWIO). `init_params` is the
reference initialization `delta = 0.05 * max|w|`; `ternary_parts` takes the result apart."""),
    new_code_cell('''w = 0.01 + 0.05 * jax.random.normal(jax.random.key(0), (3, 3, 64, 64))
params = ternarize.init_params(w)
w_t = ternarize(w, params)
parts = ternarize.ternary_parts(w, params)
print(f"delta = {float(params['delta']):.4f}   threshold t = {float(parts.threshold):.4f}   "
      f"scale alpha = {float(parts.scale):.4f}")
print(f"mean = {float(parts.mean):.4f}   std = {float(parts.std):.4f}   "
      f"sparsity = {float(jnp.mean(parts.codes == 0)):.3f}")
print("distinct values of w_t:", np.unique(np.asarray(w_t)))'''),
    new_code_cell('''fig, ax = plt.subplots(figsize=(8, 3.5))
ax.hist(np.asarray(w).ravel(), bins=120, color="0.7")
mu, t, alpha = float(parts.mean), float(parts.threshold), float(parts.scale)
for x, style, label in [(mu - t, "--", "mu - t"), (mu + t, "--", "mu + t"),
                        (alpha, "-", "+alpha"), (-alpha, "-", "-alpha")]:
  ax.axvline(x, linestyle=style, color="C0" if "t" in label else "C3", label=label)
ax.set_xlabel("weight"); ax.set_ylabel("count"); ax.legend(ncol=4, fontsize=8)
ax.set_title("weights, the two thresholds and the scale");'''),
    new_markdown_cell("""## Sweeping the threshold
The scale grows with the threshold (it is the mean of the tail beyond it); sparsity grows too.
Beyond `3 sigma` the threshold is clipped: scale and sparsity stop moving and `delta` gets no
gradient (the paper's behaviour)."""),
    new_code_cell('''deltas = jnp.linspace(0.0, 3.5 * float(parts.std), 141)
sweep = jax.vmap(lambda d: ternarize.ternary_parts(w, {"delta": d}))(deltas)
sparsity = jnp.mean(sweep.codes == 0, axis=tuple(range(1, sweep.codes.ndim)))
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
a1.plot(deltas, sweep.scale); a1.set_xlabel("delta"); a1.set_ylabel("scale alpha")
a2.plot(deltas, sparsity); a2.set_xlabel("delta"); a2.set_ylabel("sparsity")
for a in (a1, a2):
  a.axvline(3 * float(parts.std), color="k", linestyle=":", label="3 sigma clip"); a.legend()'''),
    new_markdown_cell("""## The gradient of the scale with respect to delta
`ternarize` has a custom VJP implementing the paper's closed form. With the codes held fixed,
`sum(w_t * q) / sum(q * q)` is the scale, so its gradient through `ternarize` is `d alpha / d delta`;
next to it, a central finite difference of the scale."""),
    new_code_cell('''def scale_via_vjp(d):
  q = jax.lax.stop_gradient(ternarize.ternary_parts(w, {"delta": d}).codes).astype(w.dtype)
  return jnp.sum(ternarize(w, {"delta": d}) * q) / jnp.sum(q * q)

scale_of = lambda d: ternarize.ternary_parts(w, {"delta": d}).scale
h = 1e-3
print(f"{'delta':>8} {'custom VJP':>12} {'finite diff':>12}")
for d in [0.01, 0.03, 0.06, 0.1, 0.2]:
  grad = float(jax.grad(scale_via_vjp)(jnp.float32(d)))
  fd = float((scale_of(jnp.float32(d + h)) - scale_of(jnp.float32(d - h))) / (2 * h))
  print(f"{d:>8.3f} {grad:>12.5f} {fd:>12.5f}")'''),
    new_markdown_cell("""## TGA vs TWN vs TTQ on the same tensor
Same call form `quantizer(w, params)`; TWN has no trainable parameter, TTQ learns a positive and a
negative scale."""),
    new_code_cell('''print(f"{'quantizer':<10} {'threshold':>10} {'scale +':>9} {'scale -':>9} {'sparsity':>9} {'rel. error':>10}")
for name in ["tga", "twn", "ttq"]:
  quantizer = get_quantizer(name)
  p = quantizer.init(w)
  qp = quantizer.parts(w, p)
  err = float(jnp.linalg.norm(quantizer(w, p) - w) / jnp.linalg.norm(w))
  print(f"{name:<10} {float(qp.threshold):>10.4f} {float(qp.scale):>9.4f} {float(qp.neg_scale):>9.4f} "
        f"{float(jnp.mean(qp.codes == 0)):>9.3f} {err:>10.3f}")'''),
    new_markdown_cell("""## One Flax layer
`TernaryConv` is `nn.Conv` with its kernel ternarized; the threshold `delta` is a `params` leaf next
to the kernel, so optimizers can label it."""),
    new_code_cell('''from tgq_jax.layers import TernaryConv

layer = TernaryConv(features=16, kernel_size=(3, 3))
x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
variables = layer.init(jax.random.key(2), x)
print(jax.tree.map(jnp.shape, variables))
y = layer.apply(variables, x)
kernel, delta = variables["params"]["kernel"], variables["params"]["delta"]
effective = ternarize(kernel, {"delta": delta})
print("output", y.shape, "| distinct effective kernel values:", np.unique(np.asarray(effective)).size)
grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(variables["params"])
print("d loss / d delta =", float(grads["delta"]))'''),
  ]
  return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"},
                                             "language_info": {"name": "python"}})


if __name__ == "__main__":
  nbformat.write(quickstart(), HERE / "01_quickstart.ipynb")
