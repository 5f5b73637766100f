"""What the pipeline and the methods know of a model family: one `ArchSpec` per family.

Methods ask for roles (readers and writers of the residual, norms, embedding, head) and never name a
family; the pipeline asks the spec for tensor names, the block's shape and whether a checkpoint holds
anything the block code would not carry (a bias, say), which is refused rather than silently dropped.
"""

from dataclasses import dataclass

from ..errors import StreamResizeError


@dataclass(frozen=True)
class BlockShape:
    """Full sizes of one block's five groups (DISP-LLM's I1..I5) and the widths of what they feed."""

    hidden: int
    intermediate: int
    q_out: int  # heads x head_dim
    kv_out: int  # kv heads x head_dim

    @property
    def full(self):
        return (self.hidden, self.hidden, self.hidden, self.intermediate, self.hidden)

    @classmethod
    def from_config(cls, config):
        """The block's shape from config.json: the one place head geometry is derived."""
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv_heads = config.get("num_key_value_heads") or heads
        return cls(config["hidden_size"], config["intermediate_size"], heads * head_dim, kv_heads * head_dim)

    def narrowed(self, width, intermediate):
        """Index-set sizes of a block whose residual is `width` wide and MLP `intermediate`."""
        return (width, width, width, intermediate, width)

    def parameters(self, widths):
        """Block-linear parameters (q, k, v, o, gate, up, down) at the given index-set sizes."""
        n_attn_in, n_attn_out, n_mlp_in, n_hidden, n_mlp_out = widths
        return (n_attn_in * (self.q_out + 2 * self.kv_out) + n_attn_out * self.q_out
                + n_hidden * (2 * n_mlp_in + n_mlp_out))


@dataclass(frozen=True)
class ArchSpec:
    name: str  # key into the output modeling code's FAMILY_MODULES
    architectures: tuple  # config.json "architectures" entries this spec reads
    # Readers (of attn_readers) that carry a bias the config may not declare (Qwen2's q/k/v). A reader's
    # bias is unaffected by any transform of its input side; it follows its rows when heads are removed.
    biases: tuple = ()
    # Per-head tensors inside attention, the size of head_dim and shared by every head (Qwen3's q/k
    # RMSNorm): untouched by residual-width changes and by head removal, carried to the output as they are.
    head_norms: tuple = ()
    # Width methods this family takes (None: every registered one), and why the others are refused.
    methods: tuple | None = None
    refused_why: str = ""
    # Output formats a result of this family can be written as (when the result itself fits them).
    formats: tuple = ("stock", "decilm", "bundled")
    formats_why: str = ""
    # Fused tensors: ((stored role, (part roles, in row order)), ...), e.g. Phi-3's qkv_proj and
    # gate_up_proj. Methods see the parts (split on read); the output keeps the family's fused layout.
    fused: tuple = ()
    mlp_activation: str = "act_fn"  # the MLP module's activation attribute (mlp_hidden)
    # Norms whose gains are folded into the readers (Llama's RMSNorm), so the residual can be rotated
    # and narrowed exactly. False (Gemma's (1 + w) norms, also after each sublayer): every norm keeps its
    # weight and the family's own norm class, the residual stays whole (MLP neurons and heads still go),
    # and the norms are carried as block tensors (extra_tensors).
    norms_folded: bool = True
    # Norms applied to a sublayer's output before it is added to the residual (Gemma's post-attention and
    # post-feedforward norms): (after attention, after the MLP); None where there is none.
    post_norms: tuple = ()
    embedding_scale: bool = False  # the embedding output is multiplied by sqrt(hidden_size) (Gemma)
    model_type: str = ""  # config.json's model_type of the stock output (default: the family name)
    # The attention implementation the engine computes blocks with: eager where sdpa cannot compute the
    # family's attention (Gemma 2's logit soft-capping).
    attention_implementation: str = "sdpa"
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    head: str = "lm_head.weight"
    block: str = "model.layers.{i}."
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_readers: tuple = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_writer: str = "self_attn.o_proj"
    mlp_readers: tuple = ("mlp.gate_proj", "mlp.up_proj")
    mlp_writer: str = "mlp.down_proj"

    def block_name(self, layer, role):
        return self.block.format(i=layer) + role

    @property
    def block_roles(self):
        return (self.attn_norm, *self.attn_readers, self.attn_writer, self.mlp_norm, *self.mlp_readers,
                self.mlp_writer)

    @property
    def stored_roles(self):
        """The block's roles as the checkpoint stores them: a fused tensor in place of its parts."""
        parts = {part for _, group in self.fused for part in group}
        return tuple(r for r in self.block_roles if r not in parts) + tuple(name for name, _ in self.fused)

    def stored_role(self, role):
        """(the stored tensor holding `role`, its parts or None)."""
        for name, group in self.fused:
            if role in group:
                return name, group
        return role, None

    def part_rows(self, role, config):
        """The rows of part `role` in its fused tensor: q heads x head_dim, kv heads x head_dim, or the
        MLP width, in the fused tensor's order."""
        _, group = self.stored_role(role)
        start = 0
        for part in group:
            size = self.role_rows(part, config)
            if part == role:
                return start, start + size
            start += size
        raise KeyError(role)

    def role_rows(self, role, config):
        """Output rows of a reader role in a model with this config."""
        shape = BlockShape.from_config(config)
        if role == self.attn_readers[0]:
            return shape.q_out
        if role in self.attn_readers:
            return shape.kv_out
        if role in self.mlp_readers:
            return config["intermediate_size"]
        raise KeyError(role)

    def vector_parameters(self, config, width):
        """The stored 1-d tensors of a model with this config and residual width `width`: every block's
        norms and the final norm, reader biases (their rows follow the kept heads) and per-head q/k norms.
        The block-linear formula leaves them out; --target-size counts them, so that an output does not
        pass its budget by them (Gemma 3 270M: 56k parameters; Qwen2.5-7B's biases: 130k)."""
        per_block = (2 + len(self.post_norms)) * width
        per_block += sum(self.role_rows(role, config) for role in self.biases)
        per_block += len(self.head_norms) * BlockShape.from_config(config).q_out // config["num_attention_heads"]
        return config["num_hidden_layers"] * per_block + width

    @property
    def stock_model_type(self):
        return self.model_type or self.name

    @property
    def kept_norms(self):
        """The block's residual-wide norms that keep their weights (none where norms are folded)."""
        if self.norms_folded:
            return ()
        return (self.attn_norm, self.mlp_norm) + tuple(n for n in self.post_norms if n)

    @property
    def extra_tensors(self):
        """Block tensors besides the roles' weights, by their name inside the block: reader biases,
        per-head norm weights and the norms that are not folded. Read, carried through every transform
        and written like the weights."""
        return (tuple(f"{role}.bias" for role in self.biases) + tuple(f"{norm}.weight" for norm in self.head_norms)
                + tuple(f"{norm}.weight" for norm in self.kept_norms))

    def extra_dimension(self, name):
        """What sizes extra tensor `name`: "q" or "kv" (a bias), "head_dim" (a per-head norm), "hidden"."""
        role, _, kind = name.rpartition(".")
        if kind == "bias":
            return "q" if role == self.attn_readers[0] else "kv"
        return "head_dim" if role in self.head_norms else "hidden"

    def fold(self, reader_weight, norm_weight):
        """A reader's weight with its norm's gain folded in, or as it is where norms keep their weights."""
        from ..transforms import fold_norm

        return fold_norm(reader_weight, norm_weight) if self.norms_folded else reader_weight

    def embedding_multiplier(self, config, dtype):
        """What the embedding output is multiplied by (Gemma: sqrt(hidden_size) rounded to the dtype the
        model computes in, as transformers' scaled embedding does), or None."""
        if not self.embedding_scale:
            return None
        import torch

        return torch.tensor(config["hidden_size"] ** 0.5, dtype=torch.float32).to(dtype).item()

    def residual_problem(self, method, recipe, options):
        """Why this family refuses `recipe`'s residual-width options with slicing method `method` (its
        resolved `options`), or None."""
        if self.norms_folded:
            return None
        asked = [text for text, on in (
            (f"--sparsity {recipe.sparsity}", recipe.sparsity > 0),
            ("--basis shared", recipe.basis == "shared"),
            ("-o rotate_full_width=true", bool(options.get("rotate_full_width"))),
            (f"--target-size with --mlp-ratio {recipe.mlp_ratio} (it narrows the residual)",
             recipe.target_size is not None and recipe.mlp_ratio != "fill")) if on]
        if not asked:
            return None
        return (f"the {self.name} family does not support --method {method} with {', '.join(asked)}: {self.refused_why}; "
                f"what works: {self.what_works}")

    what_works = ("--sparsity 0 with --mlp-sparsity (-o mlp_support=obs, --allocation global), "
                  "--attention-sparsity, --target-size with --mlp-ratio fill")

    def select_head_rows(self, extras, q_rows, kv_rows=None):
        """The extras after head removal: the q bias keeps the kept query heads' rows, the k/v biases
        the kept KV heads' rows (when whole KV heads go); per-head norms stay as they are."""
        q_role, *kv_roles = self.attn_readers
        out = dict(extras)
        for name, tensor in extras.items():
            role, _, kind = name.rpartition(".")
            if kind != "bias":
                continue
            if role == q_role:
                out[name] = tensor[q_rows.to(tensor.device)]
            elif role in kv_roles and kv_rows is not None:
                out[name] = tensor[kv_rows.to(tensor.device)]
        return out

    def method_problem(self, method):
        """Why this family refuses width method `method`, or None."""
        if self.methods is None or method in self.methods:
            return None
        works = f" ({self.what_works})" if not self.norms_folded else ""
        return (f"the {self.name} family does not support --method {method}: {self.refused_why}; "
                f"supported: {', '.join(self.methods)}{works}")

    def shape(self, config):
        return BlockShape.from_config(config)

    def mlp_hidden(self, mlp, x):
        """The MLP's hidden activation, the neurons a width method selects or merges: act(gate x) * up x."""
        return getattr(mlp, self.mlp_activation)(mlp.gate_proj(x)) * mlp.up_proj(x)

    def check(self, config, tensor_names, where):
        """Refuse what the block code would not carry: declared or stored biases, tensor parallel
        pre-training splits, and any block tensor outside the known roles (named)."""
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise StreamResizeError(f"{where}: linear biases are not supported yet")
        if config.get("pretraining_tp", 1) not in (None, 1):
            raise StreamResizeError(f"{where}: pretraining_tp > 1 is not supported")
        known = {f"{role}.weight" for role in self.stored_roles} | set(self.extra_tensors)
        for name in sorted(tensor_names):
            for i in range(config["num_hidden_layers"]):
                prefix = self.block.format(i=i)
                if name.startswith(prefix) and name[len(prefix):] not in known:
                    raise StreamResizeError(
                        f"{where}: the checkpoint holds '{name}', which a {self.name} block does not have "
                        "(a bias or an extra tensor); streamresize would drop it, so it refuses this model")

    def __post_init__(self):
        assert set(self.biases) <= set(self.attn_readers), "only the attention readers' biases are carried"
