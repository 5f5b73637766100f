"""How much the model's loss cares about each writer's output, channel by channel.

Structured OBS measures a removal by the error it leaves in a writer's output, ‖ΔW X‖². What the
model pays for it is the loss: to second order, ½ Σ_r F_r ‖ΔW_r X‖² / T with F_r the (diagonal,
empirical) Fisher of the loss at that output's channel r, E_t[g_{t,r}²]. Weighting the writer's rows
by F turns every block's and sublayer's OBS error into one unit, the loss (a scale that compares
layers), and tells the selection which output channels matter (a residual channel the model
ignores costs nothing).

F comes from one backward pass of the dense model on a few calibration sequences, streamed like the
rest of the engine: block inputs are kept on disk at every k-th block (k ≈ √layers), each segment is
recomputed forward from its checkpoint and then run backward one block at a time, so memory holds
one block and disk about 2√layers block inputs of those sequences.
"""

import logging
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file

from ..modeling.modeling_streamresize import family_classes
from ..runtime import fault_point
from ..writer import save_tensors

log = logging.getLogger("streamresize")

LOGITS_CHUNK = 1 << 24  # logits per chunk of positions (64 MB in float32: 64 positions of a 262k vocabulary)


def sensitivity(method, progress, sequences):
    """{"attention": (layers, d), "mlp": (layers, d)}: E_t[g²] of the loss gradient at o_proj's and
    down_proj's outputs of every block, on the first `sequences` calibration sequences (saved in the
    work dir, so a resumed run reuses it)."""
    run = method.run
    path = run.work_path("sensitivity.safetensors")
    if os.path.exists(path):
        return {k: v.to(run.device) for k, v in load_file(path).items()}
    result = _Backward(method, progress, min(sequences, run.ids.shape[0])).measure()
    save_tensors(path, {k: v.cpu().contiguous() for k, v in result.items()})
    return result


def disk_bytes(layers, sequences, seq_length, hidden):
    """The work-dir bytes the pass holds at most: its checkpoints, one segment's block inputs and two
    gradient files, each `sequences` x `seq_length` x `hidden` float32."""
    every = math.isqrt(max(layers - 1, 0)) + 1
    return (-(-layers // every) + every + 2) * sequences * seq_length * hidden * 4


class _Backward:
    def __init__(self, method, progress, n):
        self.method, self.run, self.progress, self.n = method, method.run, progress, n
        self.layers, self.d = self.run.num_layers, self.run.hidden
        self.seq = self.run.ids.shape[1]
        self.every = math.isqrt(max(self.layers - 1, 0)) + 1  # ≈ √layers: a checkpoint every `every` blocks (disk_bytes)

    # ---- files: block inputs and the gradient, (n, seq, d) float32 memory maps in the work dir ----

    def _file(self, name, create=False):
        path = self.run.work_path(f"sensitivity-{name}.f32")
        if create:
            with open(path, "wb") as f:
                f.truncate(self.n * self.seq * self.d * 4)
        return np.memmap(path, dtype=np.float32, mode="r+", shape=(self.n, self.seq, self.d))

    def _drop(self, name):
        path = self.run.work_path(f"sensitivity-{name}.f32")
        if os.path.exists(path):
            os.remove(path)

    def _read(self, view, s, grad=False):
        x = torch.from_numpy(np.ascontiguousarray(view[s:s + 1])).to(self.run.device)
        return x.requires_grad_(grad)

    # ---- passes ------------------------------------------------------------------------------

    def measure(self):
        run = self.run
        embedding = run.weight(run.family.embedding)
        first = self._file("in-0", create=True)
        for s in range(self.n):
            first[s:s + 1] = self.method._embed(embedding, (s, s + 1)).to("cpu", torch.float32).numpy()
        first.flush()
        del embedding
        self._forward(range(self.layers), drop=lambda i: i % self.every != 0)  # checkpoints and the final hidden
        grad = self._file("grad-a", create=True)
        loss = self._head(grad)
        attention = torch.zeros(self.layers, self.d, dtype=torch.float64, device=run.device)
        mlp = torch.zeros_like(attention)
        names = ["grad-a", "grad-b"]  # the gradient at block i's output, and at its input, alternate
        for start in reversed(range(0, self.layers, self.every)):
            end = min(start + self.every, self.layers)
            self._forward(range(start, end - 1), drop=lambda i: False)  # the segment's inputs again
            for i in reversed(range(start, end)):
                self.progress.set_postfix_str(f"loss sensitivity: block {i} backward")
                grad_out = self._file(names[(self.layers - 1 - i) % 2])
                grad_in = self._file(names[(self.layers - i) % 2], create=True)
                self._backward(i, grad_out, grad_in, attention[i], mlp[i])
                self._drop(f"in-{i}")
                fault_point("sensitivity")
        for name in names:
            self._drop(name)
        tokens = run.reduce_count(self.n * (self.seq - 1))
        attention, mlp = run.reduce_tensors(attention, mlp)
        log.info("loss sensitivity of %d blocks on %d tokens (mean loss %.3f); mean Fisher at each block's MLP "
                 "output: %s", self.layers, tokens, loss / max(tokens, 1),
                 " ".join(f"{float(v):.2g}" for v in (mlp.mean(-1) / tokens)))
        return {"attention": attention / tokens, "mlp": mlp / tokens}

    def _forward(self, blocks, drop):
        """The dense blocks in `blocks` (consecutive), each from its input file to the next one's;
        block i's input is deleted after it where `drop(i)`."""
        for i in blocks:
            self.progress.set_postfix_str(f"loss sensitivity: block {i} forward")
            layer, _ = self.method._dense_layer(i)
            source, target = self._file(f"in-{i}"), self._file(f"in-{i + 1}", create=True)
            with torch.no_grad():
                for s in range(self.n):
                    x = self._read(source, s)
                    h = layer.attention_residual(x, **self.method._attention_inputs(i, x))
                    target[s:s + 1] = layer.mlp_residual(h).to("cpu", torch.float32).numpy()
            target.flush()
            del layer  # before the next block's is built: two dense 7B blocks are 1.6 GB
            if drop(i):
                self._drop(f"in-{i}")
            fault_point("sensitivity")

    def _head(self, grad):
        """The summed next-token loss of the final hidden states; its gradient into `grad`."""
        run, f = self.run, self.run.family
        config = run.source_config
        norm = family_classes(f.name)[3](self.d, eps=config.get("rms_norm_eps", 1e-6)).to(run.device)
        norm.weight.data = run.weight(f.final_norm).float()
        norm.requires_grad_(False)
        head = run.weight(f.head if run.reader.has(f.head) else f.embedding).float()
        cap = config.get("final_logit_softcapping")
        final = self._file(f"in-{self.layers}")
        total, chunk = 0.0, max(1, LOGITS_CHUNK // head.shape[0])
        for s in range(self.n):
            self.progress.set_postfix_str("loss sensitivity: head")
            ids = torch.from_numpy(np.asarray(run.ids[s])).to(run.device).long()
            out = np.zeros((1, self.seq, self.d), dtype=np.float32)
            for t0 in range(0, self.seq - 1, chunk):
                t1 = min(t0 + chunk, self.seq - 1)
                h = torch.from_numpy(np.ascontiguousarray(final[s:s + 1, t0:t1])).to(run.device).requires_grad_(True)
                logits = norm(h) @ head.T
                if cap is not None:
                    logits = torch.tanh(logits / cap) * cap
                loss = torch.nn.functional.cross_entropy(logits[0], ids[t0 + 1:t1 + 1], reduction="sum")
                loss.backward()
                out[:, t0:t1] = h.grad.cpu().numpy()
                total += float(loss.detach())
            grad[s:s + 1] = out  # the last position predicts nothing: its gradient is zero
        grad.flush()
        self._drop(f"in-{self.layers}")
        return total

    def _backward(self, i, grad_out, grad_in, attention, mlp):
        """Block i backward: the gradient at its input into `grad_in`; E[g²] at o_proj's and
        down_proj's outputs summed into `attention` and `mlp`."""
        layer, _ = self.method._dense_layer(i)
        grads = {}

        def capture(name):
            def hook(module, args, out):
                out.register_hook(lambda g: grads.__setitem__(name, g))
            return hook

        hooks = [layer.self_attn.o_proj.register_forward_hook(capture("attention")),
                 layer.mlp.down_proj.register_forward_hook(capture("mlp"))]
        source = self._file(f"in-{i}")
        for s in range(self.n):
            x = self._read(source, s, grad=True)
            with torch.enable_grad():
                h = layer.attention_residual(x, **self.method._attention_inputs(i, x))
                y = layer.mlp_residual(h)
                y.backward(self._read(grad_out, s).to(y.dtype))
            attention += grads.pop("attention").reshape(-1, self.d).double().pow(2).sum(0)
            mlp += grads.pop("mlp").reshape(-1, self.d).double().pow(2).sum(0)
            grad_in[s:s + 1] = x.grad.to("cpu", torch.float32).numpy()
        grad_in.flush()
        for hook in hooks:
            hook.remove()
