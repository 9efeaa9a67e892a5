"""Amortization diagnostics: how well do the lambda nets estimate the log-partition function?

AmorLIP's claim is that a small net per modality predicts each sample's log-partition function well
enough that the encoders no longer need a large batch. Training only ever sees noisy in-batch sums,
so the loss curves cannot tell whether the nets learnt anything beyond a constant. This module
measures it on a fixed probe set of training samples, embedded with the trained encoders:

- **Population target.** For a global batch of B samples drawn without replacement from the probe
  (N samples), the in-batch partition sum of image i, ``p e^{s x_i.y_i} + sum_{j in batch, j != i}
  e^{s x_i.y_j}``, has the expectation ``Z_i = p e^{s x_i.y_i} + (B-1)/(N-1) sum_{j != i} e^{s x_i.y_j}``
  (each other sample is in the batch with probability (B-1)/(N-1)). ``log Z_i`` is what a perfect
  amortizer would output at batch size B; texts use the transpose. Computed in float64 log space
  (logsumexp / logaddexp), never as exp-then-log, so s = 100 cannot overflow.
- **Predictors**, each scored by RMSE, bias (mean of prediction - target) and Pearson correlation
  against ``log Z``: the ``ema`` lambda nets (model.pt), the ``prev`` nets (the previous epoch's EMA,
  from the training checkpoint model.pt was exported from, when it is still on disk), the
  ``in_batch`` estimate (the log-sum over one random batch of B probe samples containing i, computed
  by the training code's own :func:`amorlip.objectives.amorlip.partition_targets`), and the
  ``constant`` predictor (the target's mean, whose RMSE is the target's std): a lambda net that does
  not beat ``constant`` has learnt nothing sample-specific, and one that does not beat ``in_batch``
  gives the encoders nothing a plain batch would not.

``amorlip diagnose --config C --run R`` writes ``runs/R/amortization.json`` and ``amortization.png``
(format in docs/architecture.md, "Amortization diagnostics").

- **Gradient fidelity.** The cosine between the encoder gradient of the run's objective on one
  batch of B probe samples and on the whole probe (CLIP's loss; AmorLIP's encoder loss with Lambda =
  the batch's own sums): how closely one training batch points where a much larger batch would.

The trainer runs the same measurement on rank 0 at the end of every ``diagnostics_every_epochs``-th
epoch (:class:`EpochDiagnostics`).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amorlip.amortizer import MODALITIES, LambdaNet
from amorlip.config import RunConfig
from amorlip.fileio import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "amorlip-amortization/1"
DEFAULT_PROBE = 2048
# predictors in the order the table and the JSON list them
PREDICTORS = ("ema", "prev", "in_batch", "constant")


class DiagnoseError(ValueError):
    """A run that cannot be diagnosed (no lambda nets, too few samples); the message names the fix."""


# --------------------------------------------------------------------------- the measurements


@torch.no_grad()
def _row_population_log_partition(rows: torch.Tensor, cols: torch.Tensor, scale: float, batch_size: int,
                                  pos_coef: float, chunk: int) -> torch.Tensor:
    """``log(p e^{s r_i.c_i} + (B-1)/(N-1) sum_{j != i} e^{s r_i.c_j})`` for every row i, float64."""
    n = rows.shape[0]
    r, c = rows.double(), cols.double()
    log_p = math.log(pos_coef)
    log_frac = math.log((batch_size - 1) / (n - 1)) if batch_size > 1 else -math.inf
    out = torch.empty(n, dtype=torch.float64, device=rows.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        logits = scale * (r[start:stop] @ c.T)  # [chunk, N]
        local = torch.arange(stop - start, device=rows.device)
        positive = logits[local, local + start] + log_p
        logits[local, local + start] = -math.inf  # the negatives alone
        negatives = torch.logsumexp(logits, dim=1) + log_frac
        out[start:stop] = torch.logaddexp(positive, negatives)
    return out


def population_log_partition(img: torch.Tensor, txt: torch.Tensor, logit_scale: float, batch_size: int,
                             pos_coef: float, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The expected in-batch log-partition at batch ``batch_size``: ``(image rows [N], text rows [N])``.

    Image i's target is ``log(p e^{s x_i.y_i} + (B-1)/(N-1) sum_{j != i} e^{s x_i.y_j})`` and text j's
    is the same over column j. This is the log of the expectation (over batches of B drawn from the
    N probe samples that contain i) of the sum the training targets use; see the module docstring.
    Rows are processed ``chunk`` at a time so N = 10^4 needs ~80 MB per chunk, not N^2 memory.
    """
    n = img.shape[0]
    if txt.shape[0] != n or n < 2:
        raise ValueError(f"need N >= 2 paired features, got {img.shape[0]} images and {txt.shape[0]} texts")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size {batch_size} must lie in [1, N = {n}]")
    if pos_coef <= 0:
        raise ValueError(f"pos_coef must be > 0, got {pos_coef}")
    scale = float(logit_scale)
    return (_row_population_log_partition(img, txt, scale, batch_size, pos_coef, chunk),
            _row_population_log_partition(txt, img, scale, batch_size, pos_coef, chunk))


def in_batch_log_partition(img: torch.Tensor, txt: torch.Tensor, logit_scale: float, batch_size: int,
                           pos_coef: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's log-partition over one random batch of ``batch_size`` probe samples containing it.

    The probe is split along a seeded permutation into batches of B; the N mod B samples left over
    share one more batch, filled up with B - (N mod B) other samples whose estimates are not
    replaced. Each batch goes through the training code's :func:`partition_targets` (fp32, one rank),
    so this is exactly the noisy estimate a training step regresses the lambda nets on (before the
    mixing with the previous net). Returns float64 ``(image [N], text [N])``.
    """
    from amorlip.objectives.amorlip import partition_targets

    n = img.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size {batch_size} must lie in [1, N = {n}]")
    perm = torch.randperm(n, generator=generator).to(img.device)
    est_img = torch.full((n,), math.nan, dtype=torch.float64, device=img.device)
    est_txt = torch.full((n,), math.nan, dtype=torch.float64, device=img.device)
    full = n // batch_size
    batches = [(perm[k * batch_size:(k + 1) * batch_size], batch_size) for k in range(full)]
    rest = perm[full * batch_size:]
    if rest.numel():
        batches.append((torch.cat([rest, perm[: batch_size - rest.numel()]]), rest.numel()))
    for index, keep in batches:
        t_img, t_txt = partition_targets(img[index].float(), txt[index].float(), float(logit_scale),
                                         pos_coef=pos_coef)
        est_img[index[:keep]] = t_img[:keep].double()
        est_txt[index[:keep]] = t_txt[:keep].double()
    return est_img, est_txt


def score(prediction: Iterable[float] | np.ndarray, target: Iterable[float] | np.ndarray) -> dict[str, Any]:
    """RMSE, bias (mean prediction - target), Pearson correlation and the prediction's mean/std, float64.

    The correlation is ``None`` (JSON null) when either side has no spread (a constant predictor):
    it is undefined there, and 0 would read as "measured, no relation".
    """
    pred = np.asarray(prediction, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    if pred.shape != tgt.shape or pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"prediction {pred.shape} and target {tgt.shape} must be equal, non-empty vectors")
    err = pred - tgt
    dp, dt = pred - pred.mean(), tgt - tgt.mean()
    denom = math.sqrt(float(dp @ dp) * float(dt @ dt))
    # relative threshold: a constant vector's deviations are rounding noise, not spread
    tiny = 1e-12 * max(1.0, float(np.abs(pred).max()), float(np.abs(tgt).max())) ** 2 * pred.size
    corr = float(dp @ dt) / denom if denom > tiny else None
    return {
        "rmse": float(math.sqrt(float(err @ err) / err.size)),
        "bias": float(err.mean()),
        "corr": corr,
        "mean": float(pred.mean()),
        "std": float(pred.std()),
    }


def diagnose_features(img: torch.Tensor, txt: torch.Tensor, logit_scale: float, batch_size: int,
                      pos_coef: float, nets: dict[str, dict[str, Callable[[torch.Tensor], torch.Tensor]]],
                      seed: int = 0) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Every predictor against the population target on embedded probe features.

    ``nets``: ``{"ema": {"image": f, "text": g}, "prev": {...}}`` (any subset), each ``f`` mapping
    features ``[N, d]`` to log lambda ``[N]``. Returns ``(per-modality report, raw arrays)``: the
    report is ``{modality: {"target": {"mean", "std"}, "predictors": {name: score(...)}}}`` and the
    arrays ``{modality: {"target": ..., name: prediction}}`` (float64) for the scatter plot.
    """
    targets = dict(zip(MODALITIES, population_log_partition(img, txt, logit_scale, batch_size, pos_coef)))
    generator = torch.Generator().manual_seed(int(seed))
    in_batch = dict(zip(MODALITIES, in_batch_log_partition(img, txt, logit_scale, batch_size, pos_coef,
                                                           generator)))
    features = {"image": img, "text": txt}
    report: dict[str, Any] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for m in MODALITIES:
        target = targets[m].cpu().numpy()
        preds: dict[str, np.ndarray] = {}
        for name in ("ema", "prev"):
            if name in nets:
                with torch.no_grad():
                    preds[name] = nets[name][m](features[m].float()).double().cpu().numpy()
        preds["in_batch"] = in_batch[m].cpu().numpy()
        preds["constant"] = np.full_like(target, target.mean())
        report[m] = {
            "target": {"mean": float(target.mean()), "std": float(target.std())},
            "predictors": {name: score(pred, target) for name, pred in preds.items()},
        }
        arrays[m] = {"target": target, **preds}
    return report, arrays


# --------------------------------------------------------------------------- the probe set


def probe_priority(seed: int, key: str) -> int:
    """A sample's place in the seeded probe order: the probe is the n keys of smallest priority.

    A hash of (seed, key) rather than a shuffled list: the probe depends only on the seed and the set
    of keys, not on shard order or count, and it is picked in one streaming pass holding n samples.
    """
    digest = hashlib.sha256(f"amorlip-probe/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def select_probe(shard_dir: str | os.PathLike, size: int, seed: int) -> tuple[list[tuple[str, bytes, str]], int]:
    """``([(key, image bytes, caption)] sorted by key, samples seen)``: a fixed, seeded probe subset.

    Reads the shards listed in sizes.json with the loader's own tar reader (samples without an image
    or caption are dropped there, as in training); keeps at most ``size`` samples in memory.
    """
    from amorlip.data.loader import _DropCounter, iter_shard, read_sizes

    shard_dir = Path(shard_dir)
    sizes = read_sizes(shard_dir)
    heap: list[tuple[int, str, bytes, str]] = []  # max-heap on priority through negation
    seen = 0
    drops = _DropCounter()
    for name in sorted(sizes):
        for key, image, caption, *_ in iter_shard(shard_dir / Path(name).name, drops):
            seen += 1
            item = (-probe_priority(seed, key), key, image, caption)
            if len(heap) < size:
                heapq.heappush(heap, item)
            elif item[0] > heap[0][0]:
                heapq.heapreplace(heap, item)
    if drops.n:
        log.warning("probe: %d incomplete sample(s) in %s left out", drops.n, shard_dir)
    return sorted(((k, im, cap) for _, k, im, cap in heap), key=lambda s: s[0]), seen


@torch.no_grad()
def embed_probe(model, preprocess: Callable, tokenizer: Callable, samples: list[tuple[str, bytes, str]],
                device: str | torch.device = "cpu", batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """L2-normalised ``(image features, text features, keys)`` of the probe, eval transform, fp32.

    An image that does not decode is left out with its caption (counted in the log), so the two
    feature sets stay paired.
    """
    from PIL import Image

    model.eval()
    imgs, txts, keys = [], [], []
    bad = 0
    for start in range(0, len(samples), batch):
        pixels, captions = [], []
        for key, data, caption in samples[start:start + batch]:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    pixels.append(preprocess(im.convert("RGB")))
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
                bad += 1
                continue
            captions.append(caption)
            keys.append(key)
        if not pixels:
            continue
        imgs.append(model.encode_image(torch.stack(pixels).to(device), normalize=True).float())
        txts.append(model.encode_text(tokenizer(captions).to(device), normalize=True).float())
    if bad:
        log.warning("probe: %d image(s) did not decode and were left out", bad)
    if not imgs:
        raise DiagnoseError("no probe image decodes")
    return torch.cat(imgs), torch.cat(txts), keys


# --------------------------------------------------------------------------- the lambda nets


def _nets_from_states(states: dict[str, dict], dim: int, hidden_factor: float,
                      device: str | torch.device) -> dict[str, LambdaNet]:
    nets = {}
    for m in MODALITIES:
        net = LambdaNet(dim, hidden_factor=hidden_factor, device=device)
        net.load_state_dict(states[m], strict=True)
        nets[m] = net.eval()
    return nets


def prev_lambda_states(run_dir: Path, tag: str | None) -> tuple[dict | None, str | None]:
    """``(prev nets' state dicts, None)`` from checkpoint ``tag``'s task state, or ``(None, reason)``.

    model.pt carries only the EMA nets; the previous epoch's nets live in the trainer's client state
    of the checkpoint model.pt was exported from. That file holds tensors and plain types only and
    loads with ``weights_only=True``. A pruned or moved checkpoint is not an error: prev is left out.
    """
    from amorlip.train.export import client_state

    if not tag:
        return None, "model.pt names no checkpoint tag"
    ckpt_dir = run_dir / "checkpoints"
    if not (ckpt_dir / tag).is_dir():
        return None, f"checkpoint {ckpt_dir / tag} (model.pt's) is not on disk"
    try:
        task = client_state(ckpt_dir, tag).get("task") or {}
        return task["lambdas"]["prev"], None
    except (FileNotFoundError, KeyError, TypeError) as exc:
        return None, f"checkpoint {tag} holds no prev lambda nets ({type(exc).__name__}: {exc})"


# --------------------------------------------------------------------------- the command


def diagnose(config: dict, run_name: str, probe: int = DEFAULT_PROBE, out: str | os.PathLike | None = None,
             seed: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Measure ``runs/{run}/model.pt``'s amortization; writes ``out`` (JSON) and a PNG beside it.

    ``probe``: number of training samples (fewer when the data holds fewer, with a warning);
    ``seed``: picks the probe and the in-batch batches (default: the run's seed). The batch size B
    and pos_coef p are the run's own (model.pt's run config): the global batch the nets were trained
    for. Returns the report written.
    """
    from amorlip.config import get_run
    from amorlip.model_file import load_exported

    get_run(config, run_name)  # a name the config defines (ConfigError otherwise), never a path
    run_dir = Path(config["paths"]["runs"]) / run_name
    model, preprocess, tokenizer, meta = load_exported(run_dir / "model.pt", device)
    run = RunConfig.from_dict(meta["run"])
    if run.method != "amorlip" or not meta.get("lambda_nets"):
        raise DiagnoseError(f"run {run_name} is a {run.method} run without lambda nets: amortization "
                            "diagnostics apply to AmorLIP runs only")
    if probe < 2:
        raise DiagnoseError(f"--probe must be at least 2, got {probe}")
    seed = run.seed if seed is None else int(seed)
    batch_size, pos_coef = int(run.batch_size), float(run.amorlip.pos_coef)

    shard_dir = Path(config["paths"]["data"]) / run.dataset / "shards"
    samples, seen = select_probe(shard_dir, probe, seed)
    if len(samples) < probe:
        log.warning("probe: %s holds %d samples, fewer than the %d asked for: using all of them",
                    shard_dir, len(samples), probe)
    img, txt, keys = embed_probe(model, preprocess, tokenizer, samples, device)
    if len(keys) < batch_size:
        raise DiagnoseError(f"the probe has {len(keys)} samples, fewer than the run's batch size {batch_size}: "
                            f"the in-batch estimate needs a whole batch; raise --probe (data: {seen} samples)")
    scale = float(model.logit_scale.detach().exp())

    dim = int(meta["model_config"]["embed_dim"])
    hidden = float(run.amorlip.lambda_hidden_factor)
    nets = {"ema": _nets_from_states(meta["lambda_nets"], dim, hidden, device)}
    prev_states, prev_missing = prev_lambda_states(run_dir, meta.get("checkpoint_tag"))
    if prev_states is not None:
        nets["prev"] = _nets_from_states(prev_states, dim, hidden, device)
    else:
        log.info("prev lambda nets left out: %s", prev_missing)

    modalities, arrays = diagnose_features(img, txt, scale, batch_size, pos_coef, nets, seed=seed)
    pixels, tokens = probe_tensors(samples, preprocess, tokenizer)
    fidelity = gradient_fidelity(
        probe_encoder(model, pixels, tokens, device), _encoder_params(model), pixels.shape[0], batch_size,
        lambda a, b: objective_on_features(run.method, a, b, scale, pos_coef), torch.Generator().manual_seed(seed))
    report = {
        "format": FORMAT,
        "run": run_name,
        "method": run.method,
        "variant": run.variant,
        "step": int(meta.get("step", -1)),
        "checkpoint_tag": meta.get("checkpoint_tag"),
        "batch_size": batch_size,
        "pos_coef": pos_coef,
        "logit_scale": scale,
        "probe": {
            "size": len(keys),
            "requested": int(probe),
            "seed": seed,
            "samples_in_data": seen,
            "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
        },
        "predictors": [p for p in PREDICTORS if p in modalities["image"]["predictors"]],
        "prev_missing": prev_missing,
        "modalities": modalities,
        "gradient_fidelity": fidelity,
    }
    out = Path(out) if out is not None else run_dir / "amortization.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    plot_scatter(arrays, out.with_suffix(".png"), title=f"{run_name} (step {report['step']}, B={batch_size})")
    log.info("amortization of %s -> %s", run_name, out)
    return report


def plot_scatter(arrays: dict[str, dict[str, np.ndarray]], out: Path, title: str = "") -> Path:
    """One panel per modality: each predictor (lambda nets, in-batch) against the population target."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(arrays), figsize=(4.6 * len(arrays), 4.2), squeeze=False)
    styles = {"ema": ("tab:blue", "o"), "prev": ("tab:orange", "s"), "in_batch": ("tab:gray", ".")}
    for ax, (modality, data) in zip(axes.flat, arrays.items()):
        target = data["target"]
        for name, (colour, marker) in styles.items():
            if name in data:
                ax.scatter(target, data[name], s=6, alpha=0.5, c=colour, marker=marker, label=name)
        lo = min(float(np.min(v)) for k, v in data.items() if k != "constant")
        hi = max(float(np.max(v)) for k, v in data.items() if k != "constant")
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        ax.set_xlabel("population log-partition target")
        ax.set_ylabel("prediction (log)")
        ax.set_title(f"{modality}: {title}" if title else modality, fontsize=9)
        ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out


def format_table(report: dict[str, Any]) -> str:
    """The short table ``amorlip diagnose`` prints: one line per modality and predictor."""
    head = (f"amortization of {report['run']} (step {report['step']}, B={report['batch_size']}, "
            f"p={report['pos_coef']:g}, s={report['logit_scale']:.2f}, probe {report['probe']['size']} samples)")
    lines = [head, f"{'modality':<9}{'predictor':<11}{'rmse':>8}{'bias':>9}{'corr':>8}"]
    for modality, entry in report["modalities"].items():
        lines.append(f"{modality:<9}{'target std':<11}{entry['target']['std']:>8.4f}")
        for name in report["predictors"]:
            s = entry["predictors"][name]
            corr = "n/a" if s["corr"] is None else f"{s['corr']:.3f}"
            lines.append(f"{modality:<9}{name:<11}{s['rmse']:>8.4f}{s['bias']:>+9.4f}{corr:>8}")
    cosine = (report.get("gradient_fidelity") or {}).get("cosine")
    if cosine is not None:
        lines.append(f"gradient fidelity: cosine {cosine:.4f} between the encoder gradient of one batch of "
                     f"{report['batch_size']} and of the whole probe")
    if report.get("prev_missing"):
        lines.append(f"prev left out: {report['prev_missing']}")
    return "\n".join(lines)



# --------------------------------------------------------------------------- gradient fidelity


def objective_on_features(method: str, img: torch.Tensor, txt: torch.Tensor, logit_scale: float,
                          pos_coef: float) -> torch.Tensor:
    """The run's encoder objective on one batch of features: CLIP's loss, or AmorLIP's encoder loss
    with Lambda = the batch's own partition sums (what a perfect amortizer at that batch would give)."""
    from amorlip.objectives.amorlip import encoder_loss, partition_targets
    from amorlip.objectives.clip import clip_loss

    scale = torch.tensor(float(logit_scale), dtype=img.dtype, device=img.device)
    if method == "clip":
        return clip_loss(img, txt, scale)
    if method == "amorlip":
        t_img, t_txt = partition_targets(img, txt, scale, pos_coef=pos_coef)
        return encoder_loss(img, txt, scale, t_img, t_txt, pos_coef=pos_coef)
    raise ValueError(f"gradient fidelity covers clip and amorlip, not {method!r}")


def encoder_gradient(encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                     params: list[torch.Tensor], indices: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], chunk: int = 128) -> torch.Tensor:
    """The flat float64 gradient of ``loss_fn(encode(indices))`` with respect to ``params``.

    Two passes so that a probe of thousands of samples never holds the whole graph: the features
    without a graph, the loss's gradient with respect to them, then one vector-Jacobian product per
    chunk of ``chunk`` samples (exact: the loss couples the samples only through the features).
    ``torch.autograd.grad`` fills no ``.grad``, so training state (and DeepSpeed's gradient hooks)
    are left untouched.
    """
    with torch.no_grad():
        parts = [encode(indices[k:k + chunk]) for k in range(0, len(indices), chunk)]
    img = torch.cat([p[0] for p in parts]).detach().requires_grad_(True)
    txt = torch.cat([p[1] for p in parts]).detach().requires_grad_(True)
    with torch.enable_grad():
        g_img, g_txt = torch.autograd.grad(loss_fn(img, txt), (img, txt))
    total = [torch.zeros(p.numel(), dtype=torch.float64, device=p.device) for p in params]
    for k in range(0, len(indices), chunk):
        with torch.enable_grad():
            c_img, c_txt = encode(indices[k:k + chunk])
            grads = torch.autograd.grad((c_img, c_txt), params, grad_outputs=(g_img[k:k + chunk].to(c_img.dtype),
                                                                             g_txt[k:k + chunk].to(c_txt.dtype)),
                                        allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc += g.detach().double().reshape(-1)
    return torch.cat([t.cpu() for t in total])


def gradient_fidelity(encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                      params: list[torch.Tensor], n: int, batch_size: int,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      generator: torch.Generator, chunk: int = 128) -> dict[str, Any]:
    """Cosine between the encoder gradient of one batch of ``batch_size`` probe samples and that of the
    whole probe of ``n`` (the large-batch direction a training step approximates); 1 at B = N.

    ``encode(indices)`` returns the L2-normalised ``(image, text)`` features of those probe samples,
    with a graph to ``params`` when grad is enabled. The batch is a seeded random subset.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size {batch_size} must lie in [1, N = {n}]")
    everything = torch.arange(n)
    batch = torch.randperm(n, generator=generator)[:batch_size]
    g_batch = encoder_gradient(encode, params, batch, loss_fn, chunk)
    g_probe = encoder_gradient(encode, params, everything, loss_fn, chunk)
    denom = float(g_batch.norm() * g_probe.norm())
    return {"cosine": float(g_batch @ g_probe) / denom if denom > 0 else None,
            "batch_size": int(batch_size), "probe": int(n)}


# --------------------------------------------------------------------------- per epoch, inside training


def _encoder_params(model) -> list[torch.Tensor]:
    """The towers' trainable parameters (the logit scale and bias are not encoder weights)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and "logit_" not in name]


def probe_tensors(samples: list[tuple[str, bytes, str]], preprocess: Callable,
                  tokenizer: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels [N, 3, H, W], tokens [N, L])`` of the probe; undecodable images dropped with their caption."""
    from amorlip.data.pixels import decode_pairs

    decoded = decode_pairs(samples, preprocess, tokenizer)
    if decoded is None:
        raise DiagnoseError("no probe image decodes")
    return decoded


def probe_encoder(model, pixels: torch.Tensor, tokens: torch.Tensor, device: str | torch.device
                  ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``encode(indices) -> (image, text)``: L2-normalised fp32 features of those probe samples."""
    dtype = next(model.parameters()).dtype

    def encode(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = model.encode_image(pixels[indices].to(device, dtype), normalize=True).float()
        txt = model.encode_text(tokens[indices].to(device), normalize=True).float()
        return img, txt

    return encode


class EpochDiagnostics:
    """The trainer's end-of-epoch measurement for AmorLIP runs (``diagnostics_every_epochs``).

    Holds a fixed probe of ``run.diagnostics_probe`` training samples (picked once, seeded by the
    run's seed, preprocessed with the eval transform) and, when called with the current encoders and
    the task's lambda nets, returns the same per-modality report as ``amorlip diagnose`` plus the
    gradient fidelity of the AmorLIP encoder loss at the run's global batch. Runs on one process (the
    trainer calls it on rank 0 between barriers); encoders in eval mode, restored afterwards.
    """

    def __init__(self, shard_dir: str | os.PathLike, run: RunConfig, device: str | torch.device,
                 chunk: int = 128):
        self.shard_dir, self.run, self.device, self.chunk = Path(shard_dir), run, torch.device(device), chunk
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None

    def _load_probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        from amorlip.models import get_tokenizer, image_transform

        samples, seen = select_probe(self.shard_dir, int(self.run.diagnostics_probe), int(self.run.seed))
        pixels, tokens = probe_tensors(samples, image_transform(self.run.model, train=False),
                                       get_tokenizer(self.run.model))
        if pixels.shape[0] < self.run.batch_size:
            raise DiagnoseError(f"the probe has {pixels.shape[0]} decodable samples (data: {seen}), fewer than "
                                f"the batch size {self.run.batch_size}: raise diagnostics_probe")
        return pixels, tokens

    def __call__(self, model: torch.nn.Module, lambdas) -> dict[str, Any]:
        """``{"modalities": ..., "gradient_fidelity": ..., "logit_scale", "probe"}`` for the model now."""
        if self._probe is None:
            self._probe = self._load_probe()
        pixels, tokens = self._probe
        run, device = self.run, self.device
        encode = probe_encoder(model, pixels, tokens, device)
        was_training = model.training
        model.eval()
        try:
            n = pixels.shape[0]
            with torch.no_grad():
                parts = [encode(torch.arange(k, min(k + self.chunk, n))) for k in range(0, n, self.chunk)]
            img, txt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            scale = float(model.logit_scale.detach().float().exp())
            pos_coef, batch = float(run.amorlip.pos_coef), int(run.batch_size)
            nets = {name: {m: getattr(lambdas, name)[m] for m in MODALITIES} for name in ("ema", "prev")}
            modalities, _ = diagnose_features(img, txt, scale, batch, pos_coef, nets, seed=run.seed)
            fidelity = gradient_fidelity(
                encode, _encoder_params(model), n, batch,
                lambda a, b: objective_on_features("amorlip", a, b, scale, pos_coef),
                torch.Generator().manual_seed(int(run.seed)), self.chunk)
        finally:
            model.train(was_training)
        return {"modalities": modalities, "gradient_fidelity": fidelity, "logit_scale": scale,
                "batch_size": batch, "probe": n}


def flat_figures(report: dict[str, Any]) -> dict[str, float]:
    """``{"amort/{modality}/{predictor}_{rmse,bias,corr}": value, "amort/grad_cosine": ...}`` (None left out)."""
    flat: dict[str, float] = {}
    for modality, entry in report["modalities"].items():
        flat[f"amort/{modality}/target_std"] = entry["target"]["std"]
        for name, s in entry["predictors"].items():
            for key in ("rmse", "bias", "corr"):
                if s[key] is not None:
                    flat[f"amort/{modality}/{name}_{key}"] = s[key]
    cosine = (report.get("gradient_fidelity") or {}).get("cosine")
    if cosine is not None:
        flat["amort/grad_cosine"] = cosine
    return flat
