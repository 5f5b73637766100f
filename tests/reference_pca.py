"""A plain in-memory SliceGPT (PCA rotate-and-slice): the whole model and all activations in RAM.

It shares nothing with the streaming engine but the eigen-solver, so agreement
checks the engine's data flow: caching, micro-batching, weight transforms.
"""

import torch
from transformers import AutoModelForCausalLM

from streamresize.methods import target_width
from streamresize.methods.pca import principal_basis


def _gram(x):
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x


def reference_pca(model_dir, ids, sparsity):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    d = model.config.hidden_size
    k = target_width(d, sparsity)
    inner = model.model
    weights = {}
    with torch.no_grad():
        signals = inner.embed_tokens(ids)
        basis = principal_basis(_gram(signals), k)
        weights["model.embed_tokens.weight"] = inner.embed_tokens.weight.double() @ basis
        narrowed = (signals.double() @ basis).float()
        positions = torch.arange(ids.shape[1])[None]
        for i, layer in enumerate(inner.layers):
            p = f"model.layers.{i}."
            full = narrowed @ basis.float().T
            update = layer.self_attn(layer.input_layernorm(full), attention_mask=None,
                                     position_embeddings=inner.rotary_emb(full, positions))[0]
            attn_signals = full + update
            basis_attn = principal_basis(_gram(attn_signals), k)
            narrowed_attn = attn_signals @ basis_attn.float()
            full_attn = narrowed_attn @ basis_attn.float().T
            mlp_signals = full_attn + layer.mlp(layer.post_attention_layernorm(full_attn))
            basis_mlp = principal_basis(_gram(mlp_signals), k)

            g1, g2 = layer.input_layernorm.weight.double(), layer.post_attention_layernorm.weight.double()
            for name in ("q_proj", "k_proj", "v_proj"):
                weights[p + f"self_attn.{name}.weight"] = (getattr(layer.self_attn, name).weight.double() * g1) @ basis
            weights[p + "self_attn.o_proj.weight"] = basis_attn.T @ layer.self_attn.o_proj.weight.double()
            for name in ("gate_proj", "up_proj"):
                weights[p + f"mlp.{name}.weight"] = (getattr(layer.mlp, name).weight.double() * g2) @ basis_attn
            weights[p + "mlp.down_proj.weight"] = basis_mlp.T @ layer.mlp.down_proj.weight.double()
            weights[p + "attn_shortcut.weight"] = (basis.T @ basis_attn).T
            weights[p + "mlp_shortcut.weight"] = (basis_attn.T @ basis_mlp).T
            narrowed = (mlp_signals.double() @ basis_mlp).float()
            basis = basis_mlp
        weights["lm_head.weight"] = (model.lm_head.weight.double() * inner.norm.weight.double()) @ basis
    return weights
