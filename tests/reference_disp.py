"""A plain in-memory DISP-LLM: the stock transformers model with every calibration activation in RAM,
pruning expressed as masks (zeroed columns and rows) instead of index sets.

It shares only the pure scoring and budget functions with streamresize, so agreement checks the
engine's data flow: caching, micro-batching, the order of choices, slicing and index_add.
"""

import torch
from transformers import AutoModelForCausalLM

from streamresize.methods import disp


def _top(scores, k):
    return disp.top_indices(scores, k)


def _mask_columns(linear, keep):
    mask = torch.zeros(linear.weight.shape[1], dtype=torch.bool)
    mask[keep] = True
    linear.weight[:, ~mask] = 0


def _mask_rows(linear, keep):
    mask = torch.zeros(linear.weight.shape[0], dtype=torch.bool)
    mask[keep] = True
    linear.weight[~mask] = 0


def reference_disp(model_dir, ids, widths):
    """Index sets {(block, group): tensor} chosen by the DISP procedure without refit."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inner = model.model
    chosen = {}
    with torch.no_grad():
        x = inner.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        rotary = inner.rotary_emb(x, positions)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        for i, layer in enumerate(inner.layers):
            n1, n2, n3, n4, n5 = widths[i]
            attn, mlp = layer.self_attn, layer.mlp
            normed = layer.input_layernorm(x)
            square = normed.double().pow(2).reshape(-1, normed.shape[-1]).mean(0)
            i1 = _top(disp.input_scores(square, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), n1)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                _mask_columns(lin, i1)
            u, _ = attn(normed, position_embeddings=rotary, attention_mask=mask)
            weight = 1 / ((x + u).double().pow(2).mean(-1, keepdim=True) + 1e-12)
            i2 = _top((u.double().pow(2) * weight).reshape(-1, u.shape[-1]).sum(0), n2)
            _mask_rows(attn.o_proj, i2)
            u, _ = attn(normed, position_embeddings=rotary, attention_mask=mask)
            h = x + u

            normed = layer.post_attention_layernorm(h)
            square = normed.double().pow(2).reshape(-1, normed.shape[-1]).mean(0)
            i3 = _top(disp.input_scores(square, [mlp.gate_proj.weight, mlp.up_proj.weight]), n3)
            for lin in (mlp.gate_proj, mlp.up_proj):
                _mask_columns(lin, i3)
            a = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
            token = 1 / (h.double().pow(2).mean(-1, keepdim=True) + 1e-12)
            square = (a.double().pow(2) * token).reshape(-1, a.shape[-1]).mean(0)
            i4 = _top(square * mlp.down_proj.weight.double().pow(2).sum(0), n4)
            for lin in (mlp.gate_proj, mlp.up_proj):
                _mask_rows(lin, i4)
            m = mlp(normed)
            weight = 1 / ((h + m).double().pow(2).mean(-1, keepdim=True) + 1e-12)
            i5 = _top((m.double().pow(2) * weight).reshape(-1, m.shape[-1]).sum(0), n5)
            _mask_rows(mlp.down_proj, i5)
            x = h + mlp(normed)
            for group, index in zip(("attn_in", "attn_out", "mlp_in", "mlp_hidden", "mlp_out"), (i1, i2, i3, i4, i5)):
                chosen[(i, group)] = index
    return chosen, model
