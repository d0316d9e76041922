"""Ad hoc: how much of a non-writer's truncation KL does a refit of its block's writer absorb?

For block b and module m (q/k/v -> writer o_proj; gate/up -> writer down_proj): truncate m by whitened SVD
to `keep` of its parameters, then refit the writer (full rank, least squares on the calibration tokens:
W' X_c ~ W X_o). KL(dense || model) per token on 8 test windows x 256, (a) truncated, (b) + refit.
"""
import sys, time, json
sys.path.insert(0, "/work/main/benchmarks")
import torch
import torch.nn.functional as F
from pathlib import Path
from adasvd_lightning import load_compressed, load_tokenizer
from adasvd_lightning.core.corpus import embedded_corpus_path, read_text, tokenize_text
from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

torch.manual_seed(0)
d = Path("/work/cache/smollm2-135m")
tok = load_tokenizer(d)
model = load_compressed(d).eval()
batches = calibration_batches(tok, CalibrationSpec(None, samples=64, seq_len=256, seed=0))
test = tokenize_text(tok, read_text(embedded_corpus_path("test")))
ids = torch.as_tensor(test[: 8 * 256]).reshape(8, 256) if not torch.is_tensor(test) else test[: 8 * 256].reshape(8, 256)
keep = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
jobs = [(17, "mlp.gate_proj"), (6, "mlp.gate_proj"), (0, "mlp.gate_proj"), (6, "mlp.up_proj"),
        (17, "self_attn.q_proj"), (6, "self_attn.v_proj")]


def inputs_of(batch):
    return batch["input_ids"] if isinstance(batch, dict) else batch


@torch.no_grad()
def logp():
    return torch.cat([F.log_softmax(model(ids[i:i + 2]).logits.float(), -1) for i in range(0, 8, 2)])


@torch.no_grad()
def capture(mods):
    got = {id(m): [] for m in mods}
    hs = [m.register_forward_hook(lambda mod, a, o: got[id(mod)].append(a[0].reshape(-1, a[0].shape[-1]).double()))
          for m in mods]
    for b in batches:
        model(inputs_of(b))
    for h in hs:
        h.remove()
    return [torch.cat(got[id(m)]) for m in mods]


ref = logp()
p = ref.exp()
def kl(lq):
    return float((p * (ref - lq)).sum(-1).mean())

out = []
for b, name in jobs:
    layer = model.model.layers[b]
    mod = layer.get_submodule(name)
    writer = layer.self_attn.o_proj if "self_attn" in name else layer.mlp.down_proj
    X, Xo = capture([mod, writer])
    W = mod.weight.data.double()
    H = X.T @ X
    S = torch.linalg.cholesky(H + 1e-6 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype))
    U, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    m_, n_ = W.shape
    r = max(1, int(keep * m_ * n_ / (m_ + n_)))
    Wc = (U[:, :r] * s[:r]) @ torch.linalg.solve_triangular(S.T, Vh[:r].T, upper=True).T
    old_w, old_writer = mod.weight.data.clone(), writer.weight.data.clone()
    mod.weight.data = Wc.float()
    a = kl(logp())
    (Xc,) = capture([writer])
    G = Xc.T @ Xc
    Wo = writer.weight.data.double()
    C = Wo @ (Xo.T @ Xc)
    Wn = torch.linalg.solve(G + 1e-6 * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype), C.T).T
    writer.weight.data = Wn.float()
    bkl = kl(logp())
    # the writer refit alone with the module dense (should be ~0: the refit is the identity then)
    mod.weight.data = old_w
    writer.weight.data = old_writer
    row = dict(block=b, module=name, rank=r, kl_truncated=a, kl_refit=bkl, absorbed=1 - bkl / a)
    out.append(row)
    print(json.dumps(row), flush=True)
json.dump(out, open(f"/work/exp28/absorb_{keep}.json", "w"), indent=1)
