"""Writes the notebooks' source cells (run once by developers; the .ipynb files are committed).

    python notebooks/build_notebooks.py   # then execute them, e.g. with notebooks/run_notebooks.py

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
from tgq_jax.core.quantizers import get_quantizer

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
    new_code_cell('''from tgq_jax.frontends.linen_layers import TernaryConv

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


def train():
  params = new_code_cell('''# Parameters (CI overrides them with a smaller budget).
EPOCHS = 3            # per run; two runs (FP twin and TGA)
NUM_TRAIN = None      # None: all 60,000 training images
BATCH_SIZE = 128
WORKDIR = "runs/notebook"   # re-running resumes (or just re-evaluates) the runs found here
DATA_DIR = None       # a directory with the four Fashion-MNIST idx files, if not the default''')
  params.metadata["tags"] = ["parameters"]
  cells = [
    new_markdown_cell(f"""# Training a ternary network with TGA

{badge("02_train.ipynb")}

Trains the small CNN on Fashion-MNIST twice with the same recipe: as a full-precision twin and with
every conv and dense layer ternarized by TGA (trainable thresholds, the paper's sequential update).
Then it compares the curves, looks at each layer's sparsity and threshold, and exports the ternary
model as a 2-bit packed file. All the code lives in `tgq_jax`; this notebook only calls it."""),
    new_code_cell(INSTALL),
    params,
    new_code_cell('''import json, os
import jax
import matplotlib.pyplot as plt
import numpy as np

from tgq_jax import data, export
from tgq_jax.training import harness
from tgq_jax.training.configs import Config

print("backend:", jax.default_backend(), "| devices:", jax.devices())'''),
    new_markdown_cell("""## Data
Fashion-MNIST's idx files are read locally (Debian's `dataset-fashion-mnist` package, or
`DATA_DIR`). Without them (e.g. on Colab) TFDS prepares the dataset once; that needs TensorFlow and
internet, which Colab has."""),
    new_code_cell('''if not data.find_idx_files(DATA_DIR or data.DEFAULT_FASHION_MNIST_DIR):
  import tensorflow_datasets as tfds
  tfds.builder("fashion_mnist", file_format="array_record").download_and_prepare()
info = data.get_dataset("fashion_mnist", data_dir=DATA_DIR).info
print(info)'''),
    new_markdown_cell("""## Train the full-precision twin, then TGA
Same architecture, optimizer, schedule and data order; only the quantizer differs. Batch size must
divide by the number of devices (all local devices are used, data parallel)."""),
    new_code_cell('''common = dict(arch="small_cnn", dataset="fashion_mnist", data_dir=DATA_DIR, epochs=EPOCHS,
              num_train=NUM_TRAIN, batch_size=BATCH_SIZE, augment=False, log_every=20)
runs = {}
for quantizer in ["fp", "tga"]:
  cfg = Config(quantizer=quantizer, workdir=os.path.join(WORKDIR, quantizer), **common)
  summary = harness.train_and_evaluate(cfg, verbose=False)
  runs[quantizer] = cfg.workdir
  print(f"{quantizer}: test accuracy {100 * summary['test_accuracy']:.2f}% "
        f"({summary['steps']} steps, {summary['wall_seconds']:.0f} s)")
print(summary["report"])'''),
    new_code_cell('''def rows(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
for q, workdir in runs.items():
  train, test = rows(workdir, "train"), rows(workdir, "test")
  a1.plot([r["step"] for r in train], [r["loss"] for r in train], label=q)
  a2.plot([r["epoch"] for r in test], [100 * r["accuracy"] for r in test], "o-", label=q)
a1.set_xlabel("step"); a1.set_ylabel("train loss"); a1.legend()
a2.set_xlabel("epoch"); a2.set_ylabel("test accuracy (%)"); a2.legend()
fig.suptitle("full precision vs TGA (every layer ternary)");'''),
    new_markdown_cell("""## Per-layer sparsity and thresholds
Sparsity is the fraction of zero codes at the end of training; the trajectories are each layer's
trainable threshold `delta`, logged every `log_every` steps."""),
    new_code_cell('''final = rows(runs["tga"], "test")[-1]["layers"]
train = rows(runs["tga"], "train")
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
a1.bar([l["name"] for l in final], [l["sparsity"] for l in final])
a1.set_ylabel("sparsity (fraction of zeros)"); a1.set_title("final sparsity")
for name in train[-1]["delta"]:
  a2.plot([r["step"] for r in train], [r["delta"][name] for r in train], label=name)
a2.set_xlabel("step"); a2.set_ylabel("delta"); a2.set_title("threshold trajectories"); a2.legend(fontsize=8)
for l in final:
  print(f"{l['name']:<8} sparsity {l['sparsity']:.3f}  threshold {l['threshold']:.4f}  scale {l['scale']:.4f}")'''),
    new_markdown_cell("""## Export: 2 bits per weight
One file: codes packed 4 per byte, one scale per layer, the full-precision leaves (BatchNorm, biases)
and a JSON header. The packed model's logits equal the trained model's exactly."""),
    new_code_cell('''from tgq_jax import QuantPolicy
from tgq_jax.training import checkpoints
from tgq_jax.models import create_model

path = os.path.join(WORKDIR, "small_cnn_tga.safetensors")
report = export.export_workdir(runs["tga"], path)
print(f"{path}: {os.path.getsize(path):,} bytes")
print(report.format())

model, variables, header = export.load_packed(path)
trained = create_model("small_cnn", info.num_classes, quant=QuantPolicy("tga"))
batch = next(data.get_dataset("fashion_mnist", data_dir=DATA_DIR).eval_batches(global_batch_size=jax.device_count() * 8))
packed_logits = model.apply(variables, batch["image"], train=False)
trained_logits = trained.apply(checkpoints.load_variables(runs["tga"]), batch["image"], train=False)
print("identical logits:", bool(np.array_equal(packed_logits, trained_logits)))'''),
  ]
  return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"},
                                             "language_info": {"name": "python"}})


def your_model():
  params = new_code_cell('''# Parameters (CI overrides them with a smaller budget).
STEPS = 600          # training steps per model (batch 128: 600 steps is 1.3 epochs)
DATA_DIR = None      # a directory with the four Fashion-MNIST idx files, if not the default''')
  params.metadata["tags"] = ["parameters"]
  cells = [
    new_markdown_cell(f"""# Ternarize your own Flax model (Linen and NNX)

{badge("03_your_model.ipynb")}

A model written with plain Flax layers, here a small conv + attention network, becomes ternary with
one call: `tgq_jax.ternarize_model` intercepts the kernels of its `Dense`, `Conv`, `DenseGeneral` and
`Einsum` layers (so every projection of `MultiHeadDotProductAttention`), puts TGA's trainable
threshold `delta` beside each kernel, and leaves the model's code alone. One `QuantPolicy` says which
quantizer, which layers and per-channel statistics. Both train with one update,
`tgq_jax.training.tga.TGA` (the paper's sequential update in your own loop): Linen through the
classification step of `tgq_jax.training.algorithm`, NNX through `tgq_jax.frontends.nnx.train_step`."""),
    new_code_cell(INSTALL),
    params,
    new_code_cell('''import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx

import tgq_jax
from tgq_jax import QuantPolicy, data
from tgq_jax.training import algorithm
from tgq_jax.frontends.linen_layers import quantized_layers

dataset = data.get_dataset("fashion_mnist", data_dir=DATA_DIR)
batches = dataset.train_iterator(global_batch_size=128, seed=0, augment=False, num_devices=1)
x0 = next(iter(dataset.eval_batches(global_batch_size=1000, num_devices=1)))["image"][:8]
print(dataset.info)'''),
    new_markdown_cell("""## A Linen model of yours
Nothing in it knows about ternary weights."""),
    new_code_cell('''class MyNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1, 64)                         # 7 x 7 tokens of 64 features
    x = x + nn.MultiHeadDotProductAttention(4)(nn.LayerNorm()(x))
    return nn.Dense(10)(jnp.mean(x, axis=1))

model = tgq_jax.ternarize_model(MyNet(), QuantPolicy("tga", per_channel=True))
for path, quantizer in quantized_layers(model, x0).items():
  print(f"{'/'.join(path):<40} {quantizer}")'''),
    new_markdown_cell("""The variables are the plain model's, plus one `delta` per output feature of each kernel (heads x
head_dim for the attention's query, key and value):"""),
    new_code_cell('''shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x0))["params"]
print(jax.tree.map(lambda s: s.shape, shapes["MultiHeadDotProductAttention_0"]["query"]))'''),
    new_markdown_cell("""## Train it with the paper's sequential update, and its full-precision twin
`algorithm.init` labels the thresholds and makes the update, a `TGA` with two optimizers (here Adam
for the weights; the thresholds on the authors' optimizer: gradient clipped to +-0.001, Nesterov SGD);
`ClassificationStep(model, tga).train` is one sequential step (thresholds first, then the weights at
the new thresholds). `QuantPolicy("fp")` is the same model in full precision, trained the same way."""),
    new_code_cell('''def train_and_test(model, steps):
  layers = quantized_layers(model, x0)
  state, tga = algorithm.init(
    model, x0, optax.adam(2e-3), layers, threshold_tx=algorithm.threshold_optimizer(2e-3), train=False)
  steps_of = algorithm.ClassificationStep(model, tga)
  step, evaluate = jax.jit(steps_of.train), jax.jit(steps_of.evaluate)
  it = iter(batches)
  for _ in range(steps):
    state, metrics = step(state, next(it))
  sums = [evaluate(state, b) for b in dataset.eval_batches(global_batch_size=1000, num_devices=1)]
  return state, sum(float(s["accuracy"]) for s in sums) / sum(float(s["count"]) for s in sums)

for name, policy in [("fp", QuantPolicy("fp")), ("tga", QuantPolicy("tga", per_channel=True))]:
  state, accuracy = train_and_test(tgq_jax.ternarize_model(MyNet(), policy), STEPS)
  print(f"{name}: test accuracy {100 * accuracy:.2f}% after {STEPS} steps")'''),
    new_code_cell('''from tgq_jax.core.trees import layer_stats
for s in layer_stats(state.params, quantized_layers(model, x0)):
  print(f"{s.name:<40} sparsity {s.sparsity:.3f}  threshold {s.threshold:.4f}  scale {s.scale:.4f}")'''),
    new_markdown_cell("""## The same with Flax NNX
`tgq_jax.frontends.nnx.ternarize_model` swaps ternary layers in; thresholds are their own variable type,
`Threshold`, so `param_labels` tells them from the weights, and the same `TGA` update trains the model
through `nnx.split`/`nnx.merge` (`train_step` updates it in place)."""),
    new_code_cell('''import tgq_jax.frontends.nnx as tnnx

class MyNnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.head = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
    return self.head(jnp.mean(x, axis=(1, 2)))

net = tnnx.ternarize_model(MyNnxNet(nnx.Rngs(0)), QuantPolicy("tga", ternary_last=False), x0)
tga = algorithm.TGA(algorithm.threshold_optimizer(2e-3), optax.adam(2e-3), labels=tnnx.param_labels(net))
opt_state = tga.init(tnnx.trainable_params(net))
loss_fn = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
step = nnx.jit(tnnx.train_step, static_argnums=(0, 3))
it = iter(batches)
for _ in range(STEPS):
  b = next(it)
  opt_state, info = step(tga, net, opt_state, loss_fn, b["image"], b["label"])
correct = sum(float(jnp.sum((jnp.argmax(net(b["image"]), -1) == b["label"]) * b["mask"]))
              for b in dataset.eval_batches(global_batch_size=1000, num_devices=1))
print(f"NNX, TGA (head kept full precision): test accuracy {100 * correct / dataset.info.num_test:.2f}%")
print("conv1 delta:", float(net.conv1.delta.get_value()), "| head has a delta:", hasattr(net.head, "delta"))'''),
  ]
  return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"},
                                             "language_info": {"name": "python"}})


def ternary_lm():
  params = new_code_cell('''# Parameters (CI overrides them with a smaller budget).
STEPS = 300           # training steps (the preset's full run is 2,000)
EVAL_EVERY = 50       # validation loss every N steps
EVAL_WINDOWS = 240    # fixed validation windows
SAMPLE_TOKENS = 300   # characters sampled at the end
WORKDIR = "runs/notebook_lm"   # re-running resumes (or just re-evaluates) the run found here''')
  params.metadata["tags"] = ["parameters"]
  cells = [
    new_markdown_cell(f"""# A ternary language model with TGA

{badge("04_ternary_lm.ipynb")}

Trains a small decoder LM (Llama layout: RMSNorm, rotary positions, SwiGLU) on Tiny Shakespeare,
character by character, with every projection of every block ternary (TGA's trainable thresholds,
the paper's sequential update) and the embedding and output head in full precision. The recipe is
nanoGPT's CPU "baby" run (`--config shakespeare_char_baby`), here shortened. The text ships with
the package: nothing is downloaded. All the code lives in `tgq_jax`; this notebook only calls it."""),
    new_code_cell(INSTALL),
    params,
    new_code_cell('''import json, os
import jax
import matplotlib.pyplot as plt

from tgq_jax import data
from tgq_jax.training import harness
from tgq_jax.training.configs import PRESETS, Config
from tgq_jax.generate import generate_text

print("backend:", jax.default_backend(), "| devices:", jax.devices())'''),
    new_markdown_cell("""## The text
The vocabulary is the file's distinct characters; the first 90% of the text trains, the last 10%
validates. A training batch is random windows of 65 characters (the model sees 64 and predicts
each next one), drawn from the seed and the step, so a resumed run sees the same batches."""),
    new_code_cell('''text = data.get_dataset("text", context=64, eval_windows=EVAL_WINDOWS)
print(text.info)
print(repr(text.vocabulary.chars))
print(text.vocabulary.decode(text.train_tokens[:200]))'''),
    new_markdown_cell("""## Train
AdamW 1e-3 (beta2 0.99), warm-up then cosine to 1e-4, weight decay on matrices only, gradient
clipping; the thresholds on the authors' Nesterov SGD. Batch size must divide by the device count."""),
    new_code_cell('''cfg = Config(**{**PRESETS["shakespeare_char_baby"], "train_steps": STEPS, "eval_every": EVAL_EVERY,
                "eval_windows": EVAL_WINDOWS, "sample_tokens": 0, "workdir": WORKDIR})
summary = harness.train_and_evaluate(cfg, verbose=False)
print(f"{summary['steps']} steps in {summary['wall_seconds']:.0f} s")
print(summary["report"])'''),
    new_code_cell('''with open(os.path.join(WORKDIR, "metrics.jsonl")) as f:
  rows = [json.loads(line) for line in f]
train = [r for r in rows if r["split"] == "train"]
val = [r for r in rows if r["split"] == "val"]
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
a1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
a1.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
a1.set_xlabel("step"); a1.set_ylabel("loss (nats per character)"); a1.legend()
for name in train[-1]["delta"]:
  if name.startswith("layers_0"):
    a2.plot([r["step"] for r in train], [r["delta"][name] for r in train], label=name)
a2.set_xlabel("step"); a2.set_ylabel("delta"); a2.set_title("block 0's trainable thresholds"); a2.legend(fontsize=7)
print(f"validation: {val[-1]['loss']:.3f} nats/char = {val[-1]['bpc']:.3f} bits/char")'''),
    new_markdown_cell("""## Sample
The trained ternary model continues a prompt, one character at a time (temperature 0 is greedy)."""),
    new_code_cell('''model = harness.make_model(cfg, text.info.num_classes)
from tgq_jax.training import checkpoints
variables = checkpoints.load_variables(WORKDIR)
for temperature in (0.8, 0.0):
  print(f"--- temperature {temperature}")
  print("ROMEO:" + generate_text(model, variables, text.vocabulary, "ROMEO:", SAMPLE_TOKENS,
                                temperature=temperature))'''),
  ]
  return new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"},
                                             "language_info": {"name": "python"}})


NOTEBOOKS = {"01_quickstart.ipynb": quickstart, "02_train.ipynb": train, "03_your_model.ipynb": your_model,
             "04_ternary_lm.ipynb": ternary_lm}

if __name__ == "__main__":
  for name, build in NOTEBOOKS.items():
    nbformat.write(build(), HERE / name)
