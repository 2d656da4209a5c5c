"""TTA's full training step: JAX (the library's method, jitted) vs PyTorch eager.

    python -m benchmarks.tta_step --torch-python /work/torchenv/bin/python
    # -> benchmarks/results/tta_step_cpu.json

One step = forward, loss, backward and optimiser update of TTA (`survjax.models.tta`) on
one training batch of the default config (configs/tta.py): 32 patients, pathology bags
of 128 patches (the training cap ``train.max_instances``) of 128 features (the synthetic
cohort's patch width), genomics of 264 columns in 6 gene groups, ``d = 256``, 32
prototypes, 4 heads. Every bag is full and every modality available (as the batches of
the default run, whose bags are all longer than the cap).

JAX: the method built from the config through the library's entry points
(`survjax.models.get_method`, ``method.build``, the ``train`` stage of
``method.stages()`` with its optimiser built for the stage's step count, the gene
statistics set by the ``gene_stats`` stage's ``prepare``) and the trainer's step
(`benchmarks.common.make_train_step`: ``value_and_grad`` of the stage's ``loss_fn``, the
optax update, jitted, the state donated and fed back); compilation timed apart.

PyTorch eager (``--torch-worker``, written here as a PyTorch user would, run in the
Python that has torch): the same layers and sizes, step for step --

* the same: per-patch ``Linear(128 -> 256)`` + LeakyReLU(0.1) + dropout 0.3 (padded
  patches masked), one ``Linear`` per gene group on the standardised genomics (+
  LeakyReLU, dropout 0.3), a projection per modality and cosine logits / 0.5 to 32
  prototypes; the joint Together solve (the 128 + 6 tokens of a patient in one problem,
  plan detached, cost ``-log softmax``, zero-cost dustbin, hard uniform token marginal,
  prototype side KL-relaxed with ``tau_b = gamma / (gamma + eps)``, ``b = (rho/K, ...,
  1 - rho)``, eps 0.1, gamma 1, threshold 1e-3, at most 200 iterations); token weights
  ``0.5 softmax + 0.5`` renormalised plan rows, prototype tokens ``w^T X``; the soft
  instance cross-entropy (plan targets, dustbin-share token weights); anchor appended,
  pre-LN refinement layer (self-attention, GELU FFN x4, dropout 0.1 after attention, in
  and after the FFN) + LayerNorm, summary MLP (Linear-ReLU-Linear, normalised), two-way
  InfoNCE against the anchors (temperature 0.1); the fusion layer over the 64 prototype
  tokens, mean of each half, linear risk; Cox partial likelihood (normalised by the
  events); loss ``L_surv + 0.5 (CE_path + CE_gen) + 0.5 L_apart``; AdamW (lr 1e-4, weight
  decay 1e-5 on matrices only), gradient clipping at global norm 5; ``rho`` from the same
  schedule and the same epoch clock (so both sides solve at the same ``rho`` every step).
* different: the Sinkhorn. JAX runs the config's ott-jax solver (kernel mode,
  over-relaxation 1.55, error checked every 5 iterations, ott's loop per patient, the
  log-domain fallback behind a ``lax.cond``); torch runs the batched log-domain solver of
  benchmarks/uot.py (``torch_batched``: the same updates as ott's log mode, no
  over-relaxation, the token-marginal error checked every 10 iterations), i.e. the
  straightforward batched solver a PyTorch port would use. Both stop at 1e-3 on their
  own criterion, so the iteration counts differ (both are in the JSON, with each side's
  solve time). Also: torch's ``nn.MultiheadAttention`` (one fused q/k/v projection) for
  survjax's three projections; a constant learning rate (JAX: the stage's cosine schedule
  with 5% warm-up, a scalar); the ``rho`` clock a Python float (JAX: a ``Clock``
  parameter advanced by its own optax branch); parameter initialisation (PyTorch's
  defaults vs flax's), hence different numbers; Cox ties not grouped (continuous times).

Timing: both sides start from the same schedule position, run 2 untimed steps, then
``--repeats`` timed steps (p50 / p90 ms). The JAX step is timed in two rounds, before and
after torch, each from the same initial state (so a load change during the run does not
favour one side); its p50 is over both rounds. Torch runs three times, in separate
processes: with as many threads as cores (its default), the same with
``OMP_WAIT_POLICY=PASSIVE``, and on 1 thread; ``torch_eager`` (and the ratio) is the fastest
of them, every run is in ``torch_eager_runs``. On a shared 2-core machine whose load
exceeds the cores, torch's default OpenMP threads spin at every one of the step's
hundreds of small ops' barriers while the other thread is descheduled: the step then
takes seconds instead of a few hundred milliseconds (10 s against 0.4 s, load 3.2, with the
Sinkhorn's small ops taking most of it); a run is cut after 3 timed steps once it has
spent ``--max-seconds``. The load average is recorded around each part. ``sinkhorn``:
the JAX batched plan alone (``model.plans``, jitted apart) and the torch solver's share
of its steps, with each solver's iterations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

B, BAG, PATCH_DIM = 32, 128, 128
WARMUP = 2


def _rho(clock: float, ramp: float) -> float:
  """`survjax.models.tta.rho_schedule` at epochs elapsed ``clock``."""
  t = min(max(clock / ramp, 0.0), 1.0)
  return 0.1 + 0.9 * math.exp(-5.0 * (1.0 - t) ** 2)


# ---- PyTorch eager (run in the Python that has torch) --------------------------------------


def _torch_worker(args) -> dict:
  import numpy as np
  import torch
  import torch.nn.functional as F
  from torch import nn
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  s = json.loads(args.setup)
  d, k, heads, groups = s["dim"], s["prototypes"], s["heads"], tuple(s["group_sizes"])
  o = s["ot"]
  eps, tau_b = o["epsilon"], o["gamma"] / (o["gamma"] + o["epsilon"])
  data = np.load(args.batch)
  xp = torch.from_numpy(data["path_x"])               # float16, as the JAX batch
  pmask = torch.from_numpy(data["path_mask"])
  pavail = torch.from_numpy(data["path_avail"])
  xg = torch.from_numpy(data["gen_x"])
  gavail = torch.from_numpy(data["gen_avail"])
  t, ev = torch.from_numpy(data["time"]), torch.from_numpy(data["event"])
  w_rows = torch.from_numpy(data["weights"])
  gmean, gstd = torch.from_numpy(data["gene_mean"]), torch.from_numpy(data["gene_std"])

  class Layer(nn.Module):
    """Pre-LN transformer layer (survjax.nn.attention.TransformerLayer)."""

    def __init__(self, p):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
      self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
      self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
      self.drop = nn.Dropout(p)

    def forward(self, x):
      h = self.norm1(x)
      x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
      h = self.drop(F.gelu(self.fc1(self.norm2(x))))
      return x + self.drop(self.fc2(h))

  mods = ("pathology", "genomics")

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.patch_embed = nn.Linear(s["patch_dim"], d)
      self.gene_embed = nn.ModuleList([nn.Linear(g, d) for g in groups])
      self.prototypes = nn.Parameter(torch.randn(k, d))
      self.proj = nn.ModuleDict({m: nn.Linear(d, d) for m in mods})
      self.anchors = nn.ParameterDict({m: nn.Parameter(0.02 * torch.randn(d)) for m in mods})
      self.refine = nn.ModuleDict({m: Layer(s["dropout_attn"]) for m in mods})
      self.refine_norm = nn.ModuleDict({m: nn.LayerNorm(d, eps=1e-6) for m in mods})
      self.summary1, self.summary2 = nn.Linear(d, d), nn.Linear(d, d)
      self.fusion = Layer(s["dropout_attn"])
      self.head = nn.Linear(2 * d, 1)
      self.drop = nn.Dropout(s["dropout"])

    def tokens(self):
      mask = pmask & pavail[:, None]
      x = torch.where(mask[..., None], xp.float(), 0.0)
      tp = self.drop(F.leaky_relu(self.patch_embed(x), 0.1))
      g = torch.where(gavail[:, None], (xg.float() - gmean) / gstd, 0.0)
      tg = self.drop(torch.stack([F.leaky_relu(lin(part), 0.1) for lin, part in
                                  zip(self.gene_embed, g.split(groups, dim=1))], 1))
      return {"pathology": (tp, mask),
              "genomics": (tg, gavail[:, None].expand(-1, len(groups)))}

    def logits(self, m, x):
      p = F.normalize(self.prototypes, dim=-1)
      return F.normalize(self.proj[m](x), dim=-1) @ p.T / s["proto_temperature"]

    def refined(self, m, proto):
      anchor = self.anchors[m].expand(proto.shape[0], 1, d)
      h = self.refine_norm[m](self.refine[m](torch.cat([proto, anchor], 1)))
      p = F.normalize(self.summary2(torch.relu(self.summary1(h.mean(1)))), dim=-1)
      return h[:, :k], p

  def sinkhorn(logits, mask, rho):
    """benchmarks/uot.py's batched log-domain solver on TTA's joint problem (no grad)."""
    cost = torch.where(mask[..., None], -torch.log_softmax(logits, -1), 0.0)
    c = torch.cat([cost, torch.zeros_like(cost[..., :1])], -1)
    m = mask.float()
    la = torch.log(m / m.sum(1, keepdim=True).clamp_min(1.0))           # -inf at padding
    lb = torch.log(torch.tensor([rho / k] * k + [1.0 - rho]))[None].expand(c.shape[0], -1)
    f = torch.zeros(c.shape[:2])
    g = torch.zeros(c.shape[0], c.shape[2])
    it = 0
    while it < o["max_iterations"]:
      g = tau_b * (eps * lb - eps * torch.logsumexp((f[:, :, None] - c) / eps, dim=1))
      row = torch.logsumexp((g[:, None, :] - c) / eps, dim=2)
      it += 1
      if it % 10 == 0:
        err = (torch.exp(f / eps + row) - torch.exp(la)).abs().sum(1).max()
        if float(err) < o["threshold"]:
          break
      f = eps * la - eps * row
    f = eps * la - eps * torch.logsumexp((g[:, None, :] - c) / eps, dim=2)
    return torch.exp((f[:, :, None] + g[:, None, :] - c) / eps), it

  def wmean(v, w):
    return (w * torch.where(w > 0, v, 0.0)).sum() / w.sum().clamp_min(1e-12)

  def instance_ce(logits, plan, mask, w):
    mass = plan[..., :k].sum(-1)
    q = plan[..., :k] / mass.clamp_min(1e-30)[..., None]
    u = torch.where(mask, mass / plan.sum(-1).clamp_min(1e-30), 0.0)
    ce = -(q * torch.log_softmax(logits, -1)).sum(-1)
    return wmean((u * ce).sum(-1) / u.sum(-1).clamp_min(1e-12), w)

  def apart(summary, anchors, w):
    p = torch.stack([summary[m] for m in mods], 1)
    a = F.normalize(torch.stack([anchors[m] for m in mods], 0), dim=-1)
    sim = torch.einsum("bmd,nd->bmn", p, a) / s["contrast_temperature"]
    eye = torch.eye(len(mods))
    s2a = -(eye * torch.log_softmax(sim, -1)).sum((1, 2)) / len(mods)
    a2s = -(eye * torch.log_softmax(sim, -2)).sum((1, 2)) / len(mods)
    return wmean(0.5 * (s2a + a2s), w)

  def cox(risk, w):
    order = torch.argsort(t, descending=True)
    r, e, ww = risk[order], ev[order] * w[order], w[order]
    lse = torch.logcumsumexp(r + torch.log(ww.clamp_min(1e-30)), 0)
    return -((r - lse) * e).sum() / e.sum().clamp_min(1e-12)

  net = Net()
  decay = [p for p in net.parameters() if p.ndim >= 2]
  no_decay = [p for p in net.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}], lr=s["lr"])
  clock = {"epochs": 0.0}
  solve_s, iters = [], []

  def step():
    rho = _rho(clock["epochs"], s["rho_ramp_epochs"])
    opt.zero_grad(set_to_none=True)
    toks = net.tokens()
    logits = {m: net.logits(m, x) for m, (x, _) in toks.items()}
    t0 = time.perf_counter()
    with torch.no_grad():
      plan, it = sinkhorn(torch.cat([logits[m].detach() for m in mods], 1),
                          torch.cat([toks[m][1] for m in mods], 1), rho)
    solve_s.append(time.perf_counter() - t0)
    iters.append(it)
    plans = dict(zip(mods, plan.split([toks[m][0].shape[1] for m in mods], 1)))
    summary, halves = {}, {}
    for m, avail in (("genomics", gavail), ("pathology", pavail)):
      x, mask = toks[m]
      soft = torch.where(mask[..., None], torch.softmax(logits[m], -1), 0.0)
      q = plans[m][..., :k]
      q = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
      w = torch.where(mask[..., None], 0.5 * soft + 0.5 * q, 0.0)
      proto = torch.einsum("bnk,bnd->bkd", w, x)
      proto = torch.where(avail[:, None, None], proto, net.anchors[m].expand(B, k, d))
      halves[m], summary[m] = net.refined(m, proto)
    fused = net.fusion(torch.cat([halves["genomics"], halves["pathology"]], 1))
    risk = net.head(torch.cat([fused[:, :k].mean(1), fused[:, k:].mean(1)], -1))[:, 0]
    ce = sum(instance_ce(logits[m], plans[m], toks[m][1], w_rows * a)
             for m, a in (("pathology", pavail), ("genomics", gavail)))
    both = w_rows * pavail.float() * gavail.float()
    loss = (cox(risk, w_rows) + s["ce_weight"] * ce
            + s["apart_weight"] * apart(summary, net.anchors, both))
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), s["grad_clip"])
    opt.step()
    clock["epochs"] += s["clock_step"]
    return float(loss.detach())

  load0 = os.getloadavg()[0]
  for _ in range(WARMUP):
    step()
  solve_s.clear()
  iters.clear()
  times, start = [], time.perf_counter()
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
    if len(times) >= 3 and time.perf_counter() - start > args.max_seconds:
      break  # a collapsed configuration (see the module docstring) is not waited out
  ts, ss = np.sort(np.asarray(times)) * 1e3, np.sort(np.asarray(solve_s)) * 1e3
  return {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
          "times_ms": [round(1e3 * x, 3) for x in times],
          "p50_ms": float(np.percentile(ts, 50)), "p90_ms": float(np.percentile(ts, 90)),
          "min_ms": float(ts.min()), "repeats": len(times), "last_loss": loss,
          "sinkhorn": {"p50_ms": float(np.percentile(ss, 50)),
                       "share_of_step_p50": float(np.percentile(ss, 50) / np.percentile(ts, 50)),
                       "iterations": iters,
                       "solver": "benchmarks/uot.py torch_batched (log domain, no momentum, "
                                 "token-marginal error every 10 iterations)"},
          "parameters": sum(p.numel() for p in net.parameters()),
          "load_average_1min_start": load0, "load_average_1min_end": os.getloadavg()[0]}


# ---- JAX ------------------------------------------------------------------------------------


def _setup(config, info):
  """What the torch worker needs to build the same model and schedule."""
  m = config.model
  c = config
  n_train = round(c.data.synthetic.n_patients * (1 - 1 / c.cv.num_folds)
                  * (1 - c.cv.val_fraction))
  total_steps = m.epochs * math.ceil(n_train / c.train.batch_size)
  return {"dim": m.dim, "prototypes": m.num_prototypes, "heads": m.num_heads,
          "patch_dim": info["pathology"]["dim"],
          "group_sizes": list(info["genomics"]["group_sizes"]),
          "proto_temperature": m.proto_temperature, "dropout": m.dropout,
          "dropout_attn": m.dropout_attn, "ot": m.ot.to_dict(),
          "rho_ramp_epochs": m.rho_ramp_epochs, "ce_weight": m.ce_weight,
          "apart_weight": m.apart_weight, "contrast_temperature": m.contrast_temperature,
          "lr": m.lr, "weight_decay": m.weight_decay, "grad_clip": m.grad_clip,
          "epochs": m.epochs, "total_steps": total_steps, "training_patients": n_train,
          "clock_step": m.epochs / total_steps}


def _jax_iterations(jax, jnp, logits, mask, rho, o):
  """Iterations ott's solver takes per patient on the joint problem (untimed; one patient
  at a time, as `survjax.ot.batched_plan` runs it with ``patients_per_solve = 1``)."""
  from survjax import ot
  cost, a, _, _ = jax.vmap(lambda l, m: ot._setup(l, m, True))(logits, mask)  # noqa: SLF001
  b = ot.prototype_marginal(logits.shape[-1], rho)
  one = lambda c, a_: ot.ott_solve(
      c, a_, b, epsilon=o["epsilon"], tau_a=1.0, tau_b=ot.kl_tau(o["gamma"], o["epsilon"]),
      threshold=o["threshold"], max_iterations=o["max_iterations"], implicit=False,
      mode=o["mode"], momentum=o["momentum"], inner_iterations=o["inner_iterations"]
  )[0].n_iters
  return jax.lax.map(lambda x: one(*x), (cost, a))


def _jax_part(args, batch_path: str):
  import warnings
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from benchmarks import common
  from configs import tta as tta_config
  from survjax.models import get_method
  from survjax.models.tta import GEN, PATH

  config = tta_config.get_config()
  method = get_method(config)
  stages = {s.name: s for s in method.stages()}
  info, batch = common.synthetic_batch(method, B, config.train.max_instances, PATCH_DIM)
  setup = _setup(config, info)
  model = method.build(info, nnx.Rngs(0))
  if "gene_stats" in stages:  # the first stage: the fold's genomic column statistics
    stages["gene_stats"].prepare(model, method.gene_features(model, batch))
  stage = dataclasses.replace(stages["train"],
                              optimizer=stages["train"].optimizer(setup["total_steps"]))
  graphdef, trainable, rest = nnx.split(model, stage.trainable, ...)
  opt_state = stage.optimizer.init(trainable)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  np.savez(batch_path, path_x=batch["modalities"][PATH]["x"],
           path_mask=batch["modalities"][PATH]["mask"],
           path_avail=batch["modalities"][PATH]["available"],
           gen_x=batch["modalities"][GEN]["x"], gen_avail=batch["modalities"][GEN]["available"],
           time=batch["time"], event=batch["event"],
           weights=(batch["valid"] & batch["labelled"]).astype(np.float32),
           gene_mean=np.asarray(model.gene_mean[...]), gene_std=np.asarray(model.gene_std[...]))
  batch = jax.device_put(batch)
  init = jax.device_get((trainable, opt_state))

  step = common.make_train_step(stage, graphdef)
  load0 = os.getloadavg()[0]
  compiled, compile_s = common.compile_timed(step, trainable, opt_state, rest, batch,
                                             jax.random.key(0))
  common.log(f"jax: compiled the step in {compile_s:.1f} s")

  def round_():
    tr, os_ = jax.device_put(init)
    load = os.getloadavg()[0]
    stats, tr, os_ = common.time_train_steps(compiled, tr, os_, rest, batch,
                                             repeats=args.repeats, warmup=WARMUP)
    stats["load_average_1min"] = load
    return stats, tr

  # The Together solve alone, as the step computes it: model.plans on the step's tokens and
  # logits (same batch, dropout key, initial parameters) at each timed step's rho.
  def toks_logits(tr, rest, batch, key):
    mdl = nnx.merge(graphdef, tr, rest)
    k_fwd = jax.random.split(key)[1]                          # TTA.loss's key split
    toks = mdl.tokens(batch, method.modalities, jax.random.split(k_fwd, 4)[0])
    return toks, {m: mdl.logits(m, x) for m, (x, _) in toks.items()}

  def plans(tr, rest, toks, logits, rho):
    return nnx.merge(graphdef, tr, rest).plans(toks, logits, rho)

  def iterations(toks, logits, rho):
    names = list(toks)
    return _jax_iterations(jax, jnp, jnp.concatenate([logits[m] for m in names], 1),
                           jnp.concatenate([toks[m][1] for m in names], 1), rho, setup["ot"])

  tr0, _ = jax.device_put(init)
  toks, logits = jax.jit(toks_logits)(tr0, rest, batch, jax.random.key(WARMUP))
  rhos = [jnp.float32(_rho(i * setup["clock_step"], setup["rho_ramp_epochs"]))
          for i in range(WARMUP, WARMUP + args.repeats)]
  solve_c, solve_compile_s = common.compile_timed(plans, tr0, rest, toks, logits, rhos[0])
  solve_stats = common.time_calls(solve_c, repeats=args.repeats, warmup=1,
                                  make_args=lambda i: (tr0, rest, toks, logits,
                                                       rhos[max(i - 1, 0)]))
  iters_c = jax.jit(iterations)
  iters = [np.asarray(iters_c(toks, logits, r)) for r in rhos]
  first, _ = round_()
  common.log(f"jax: step p50 {first['p50_ms']:.1f} ms (load {first['load_average_1min']:.2f})")
  return {"setup": setup, "n_params": n_params, "compiled": compiled, "round": round_,
          "first": first, "compile_s": compile_s, "load0": load0,
          "sinkhorn": {"p50_ms": solve_stats["p50_ms"], "p90_ms": solve_stats["p90_ms"],
                       "compile_s": solve_compile_s, "share_of_step_p50": None,
                       "iterations_max": [int(x.max()) for x in iters],
                       "iterations_mean": [round(float(x.mean()), 1) for x in iters],
                       "solver": "survjax.ot.batched_plan with configs/tta.py's settings "
                                 "(ott-jax kernel mode, momentum 1.55, error every 5 "
                                 "iterations, a loop per patient)",
                       "note": "model.plans alone, jitted apart, on the tokens and logits "
                               "of the first timed step's batch and dropout key at the "
                               "initial parameters, at each timed step's rho; iterations "
                               "per patient (max and mean over the batch) are ott's "
                               "n_iters of the kernel solve on the same problems"}}


def _torch_configs(threads: int):
  """(label, threads, extra environment) of the torch runs; the fastest is compared."""
  out = [(f"{threads} thread" + ("s" if threads > 1 else ""), threads, {})]
  if threads > 1:
    out += [(f"{threads} threads, OMP_WAIT_POLICY=PASSIVE", threads,
             {"OMP_WAIT_POLICY": "PASSIVE"}), ("1 thread", 1, {})]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="benchmarks/results/tta_step_cpu.json")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--torch-python", default=os.environ.get("SURVJAX_TORCH_PYTHON"))
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--batch", help=argparse.SUPPRESS)
  p.add_argument("--setup", help=argparse.SUPPRESS)
  p.add_argument("--max-seconds", type=float, default=60.0,
                 help="per torch configuration: stop timing (after 3 steps) past this")
  args = p.parse_args(argv)
  if args.torch_worker:
    print(json.dumps(_torch_worker(args)))
    return

  from benchmarks import common
  with tempfile.TemporaryDirectory() as tmp:
    batch_path = os.path.join(tmp, "batch.npz")
    j = _jax_part(args, batch_path)
    setup = j["setup"]
    py = common.torch_python(args.torch_python) or sys.executable
    common.log(f"torch eager in {py}")
    torch_runs = []
    for label, threads, env in _torch_configs(args.threads):
      res, reason = common.run_json_subprocess(
          [py, os.path.abspath(__file__), "--torch-worker", "--repeats", str(args.repeats),
           "--threads", str(threads), "--max-seconds", str(args.max_seconds),
           "--batch", batch_path, "--setup", json.dumps(setup)],
          1800, env={**os.environ, **env})
      torch_runs.append(dict(res, config=label) if res else {"config": label, "error": reason})
      common.log(f"torch ({label}): " + (f"p50 {res['p50_ms']:.1f} ms" if res else reason))
  timed = [r for r in torch_runs if "p50_ms" in r]
  torch_res = min(timed, key=lambda r: r["p50_ms"]) if timed else None
  reason = None if timed else "; ".join(r["error"] for r in torch_runs)
  second, _ = j["round"]()
  common.log(f"jax: second round p50 {second['p50_ms']:.1f} ms "
             f"(load {second['load_average_1min']:.2f})")
  first = j["first"]
  jax_res = common.summarize([x / 1e3 for x in first["times_ms"] + second["times_ms"]])
  jax_res.update(compile_s=j["compile_s"], trainable_params=j["n_params"],
                 rounds=[{"p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"],
                          "load_average_1min": r["load_average_1min"],
                          "last_loss": r["last_loss"]} for r in (first, second)])
  sk = j["sinkhorn"]
  sk["share_of_step_p50"] = sk["p50_ms"] / jax_res["p50_ms"]
  jax_res["sinkhorn"] = sk
  o = setup["ot"]
  result = {
      "benchmark": "tta_step",
      "command": "python -m benchmarks.tta_step --torch-python=..."
                 + (f" --repeats {args.repeats}" if args.repeats != 20 else ""),
      "shapes": {"batch": B, "bag": BAG, "patch_dim": setup["patch_dim"],
                 "gene_groups": setup["group_sizes"], "genomic_columns": sum(setup["group_sizes"]),
                 "dim": setup["dim"], "prototypes": setup["prototypes"],
                 "heads": setup["heads"],
                 "ot_tokens_per_patient": BAG + len(setup["group_sizes"]),
                 "ot_columns": setup["prototypes"] + 1},
      "config": {"file": "configs/tta.py", "ot": o, "lr": setup["lr"],
                 "weight_decay": setup["weight_decay"], "grad_clip": setup["grad_clip"],
                 "schedule_total_steps": setup["total_steps"],
                 "training_patients_per_fold": setup["training_patients"],
                 "rho_per_timed_step": [
                     round(_rho(i * setup["clock_step"], setup["rho_ramp_epochs"]), 4)
                     for i in range(WARMUP, WARMUP + args.repeats)]},
      "jax": jax_res,
      "torch_eager": torch_res or {"error": reason},
      "torch_eager_runs": [{k: v for k, v in r.items() if k != "times_ms"}
                           for r in torch_runs],
      "device": common.device_info(),
      "git": common.git_state(),
      "load_average_1min": {"start": j["load0"], "end": os.getloadavg()[0]},
  }
  if torch_res:
    result["ratio_torch_over_jax_p50"] = torch_res["p50_ms"] / jax_res["p50_ms"]
    result["ratio_torch_over_jax_sinkhorn_p50"] = (torch_res["sinkhorn"]["p50_ms"]
                                                   / sk["p50_ms"])
    result["ratio_torch_over_jax_p50_by_config"] = {
        r["config"]: r["p50_ms"] / jax_res["p50_ms"] for r in timed}
  common.emit(args.out, result)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
