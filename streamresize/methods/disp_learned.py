"""DISP-LLM's own width optimiser (`--allocation learned`): a hypernetwork emits a keep mask for every
group of every block; it is trained on frozen weights with the LM loss plus λ·|log(kept / target)|.

The hypernetwork follows the paper: a bidirectional GRU over the blocks (fixed random inputs), and
per group kind a LayerNorm + GELU + linear head giving one logit per channel; masks are Gumbel-
sigmoid samples rounded with a straight-through gradient. Training back-propagates through the
whole model (per-block activation checkpointing), so the model must fit on the device; only the
widths it learns are kept, and the streaming pass chooses the channels inside them.
"""

import json
import logging
import math
import os
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..errors import StreamResizeError

log = logging.getLogger("streamresize")
DEFAULTS = {"learn_steps": 200, "learn_lr": 1e-3, "learn_lambda": 6.0, "learn_tau": 0.5, "learn_batch": 1,
            "learn_seq": 256}


class MaskHypernetwork(nn.Module):
    def __init__(self, num_layers, group_sizes, width=64, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("inputs", torch.randn(1, num_layers, width, generator=generator))
        self.gru = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, size))
                                   for size in group_sizes)

    def logits(self):
        states, _ = self.gru(self.inputs)
        return [head(states[0]) for head in self.heads]  # per group kind: (layers, size)

    def sample(self, tau):
        """Gumbel-sigmoid masks, 0/1 forward, sigmoid gradient backward (straight-through)."""
        masks = []
        for logit in self.logits():
            u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / tau)
            masks.append((soft > 0.5).to(soft.dtype) - soft.detach() + soft)
        return masks

    def budget_masks(self, shape, budget):
        """Deterministic masks that meet the budget: the channels whose logits clear one threshold,
        the lowest threshold whose kept parameters fit. The λ term only pulls the sampled masks
        towards the budget, and a short run ends far from it (on SmolLM2-135M, 200 steps kept 50 %
        of the parameters for a 76 % target); the learned ranking still decides which groups keep what."""
        with torch.no_grad():
            logits = self.logits()
            values = torch.cat([l.flatten() for l in logits]).sort().values
            low, high = 0, len(values)  # keep channels with logit >= values[index]; fewer as index grows
            while low < high:
                mid = (low + high) // 2
                if kept_parameters(shape, [(l >= values[mid]).float() for l in logits]) <= budget:
                    high = mid
                else:
                    low = mid + 1
            threshold = values[low] if low < len(values) else float("inf")
            return [(l >= threshold).float() for l in logits]


def masked_block(layer, x, m1, m2, m3, m4, m5, position_embeddings):
    """The dense block with masks on its five groups (the pruned block, expressed with zeros)."""
    update, _ = layer.self_attn(layer.input_layernorm(x) * m1, position_embeddings=position_embeddings,
                                attention_mask=None)
    h = x + update * m2
    z = layer.post_attention_layernorm(h) * m3
    mlp = layer.mlp
    return h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(z)) * mlp.up_proj(z) * m4) * m5


def kept_parameters(shape, masks):
    return shape.parameters([m.sum(-1) for m in masks]).sum()


def memory_needed(model_dir, shape, layers, vocab, batch, seq):
    """Bytes to train the masks: fp32 weights, checkpointed block inputs, one block's activations, logits."""
    from ..checkpoint import parameter_count

    tokens = batch * seq
    activations = tokens * (layers * shape.hidden + 12 * shape.hidden + 4 * shape.intermediate + 3 * vocab) * 4
    return parameter_count(model_dir) * 4 + activations


def available_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def learn_widths(model_dir, ids, shape, budget, options, device, seed=0):
    """Train the hypernetwork; returns (per-block widths of the learned masks, training log)."""
    from transformers import AutoModelForCausalLM

    batch, seq = int(options["learn_batch"]), min(int(options["learn_seq"]), ids.shape[1])
    config = json.load(open(os.path.join(model_dir, "config.json")))
    need = memory_needed(model_dir, shape, config["num_hidden_layers"], config["vocab_size"], batch, seq)
    have = available_memory(device)
    if need > have:
        raise StreamResizeError(
            f"{model_dir}: --allocation learned trains on the whole model: it needs about {need / 2**30:.1f} GiB "
            f"on {device}, {have / 2**30:.1f} GiB are free; use --allocation global, which streams, or a "
            "larger device")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True, trust_remote_code=False)
    model = model.to(device).eval()  # sdpa: causal without a mask tensor
    model.requires_grad_(False)
    inner = model.model
    net = MaskHypernetwork(len(inner.layers), shape.full, seed=seed).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=float(options["learn_lr"]))
    lam, tau, steps = float(options["learn_lambda"]), float(options["learn_tau"]), int(options["learn_steps"])
    history = []
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(range(steps), desc="learning widths", disable=not sys.stderr.isatty(), file=sys.stderr)
    for step in progress:
        rows = torch.randint(0, ids.shape[0], (batch,), generator=generator)
        start = int(torch.randint(0, ids.shape[1] - seq + 1, (1,), generator=generator))
        tokens = torch.as_tensor(ids[rows.numpy(), start:start + seq]).long().to(device)
        masks = net.sample(tau)
        x = inner.embed_tokens(tokens)
        positions = torch.arange(seq, device=device)[None]
        rotary = inner.rotary_emb(x, positions)
        for i, layer in enumerate(inner.layers):
            x = checkpoint(masked_block, layer, x, *(m[i] for m in masks), rotary, use_reentrant=False)
        logits = model.lm_head(inner.norm(x)).float()
        lm_loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        kept = kept_parameters(shape, masks)
        budget_loss = (torch.log(kept.clamp_min(1.0)) - math.log(budget)).abs()
        loss = lm_loss + lam * budget_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record = {"step": step, "lm_loss": lm_loss.item(), "kept_ratio": kept.item() / budget}
        history.append(record)
        progress.set_postfix_str(f"LM loss {record['lm_loss']:.3f}, kept/target {record['kept_ratio']:.3f}")
        if step % 20 == 0 or step == steps - 1:
            log.info("learning widths: step %d/%d, LM loss %.3f, kept/target %.3f", step + 1, steps,
                     record["lm_loss"], record["kept_ratio"])
    masks = net.budget_masks(shape, budget)
    widths = [tuple(int(m[i].sum()) for m in masks) for i in range(len(inner.layers))]
    del model
    return widths, history


def round_widths(widths, shape, multiple):
    """Learned mask sizes rounded to the width multiple (at least one multiple, at most the full size)."""
    out = []
    for block in widths:
        out.append(tuple(max(min(multiple, full), min(full, int(round(n / multiple)) * multiple))
                         for n, full in zip(block, shape.full)))
    return out
