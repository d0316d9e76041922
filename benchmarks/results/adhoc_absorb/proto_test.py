import sys, torch
sys.path.insert(0, "/work/main/tests")
from conftest import tiny_model
from adasvd_lightning.core.factorization import factorize
from adasvd_lightning.core.whitening import compute_whitening
from adasvd_lightning.core.refinement import GramStatistics, RefinementTarget, u_step

for seed in range(3):
    model = tiny_model("llama", seed).double()
    g = torch.Generator().manual_seed(seed)
    calib = torch.randint(0, 128, (32, 32), generator=g)
    probe = torch.randint(0, 128, (8, 32), generator=g)
    mlp = model.model.layers[0].mlp

    def inputs(mod):
        got = []
        h = mod.register_forward_hook(lambda m, a, o: got.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            model(calib)
        h.remove()
        return torch.cat(got)

    with torch.no_grad():
        ref = torch.log_softmax(model(probe).logits, -1)

    def kl():
        with torch.no_grad():
            lq = torch.log_softmax(model(probe).logits, -1)
        return float((ref.exp() * (ref - lq)).sum(-1).mean())

    for name in ("gate_proj", "up_proj"):
        inner = getattr(mlp, name)
        x = inputs(inner)
        xo = inputs(mlp.down_proj)
        w_inner, w_down = inner.weight.data.clone(), mlp.down_proj.weight.data.clone()
        f = factorize(w_inner, 4, compute_whitening(x.T @ x / len(x)))
        fw = factorize(w_down, 24, compute_whitening(xo.T @ xo / len(xo)))
        mlp.down_proj.weight.data = fw.up @ fw.down
        alone = kl()
        inner.weight.data = f.up @ f.down
        no_step = kl() - alone
        xc = inputs(mlp.down_proj)
        t = RefinementTarget(w_down, GramStatistics(xc.T @ xc / len(xc), xo.T @ xc / len(xc), xo.T @ xo / len(xo)))
        mlp.down_proj.weight.data = u_step(t, fw.down) @ fw.down
        step = kl()
        inner.weight.data = w_inner
        t0 = RefinementTarget(w_down, GramStatistics.single_stream(xo.T @ xo / len(xo)))
        mlp.down_proj.weight.data = u_step(t0, fw.down) @ fw.down
        step_alone = kl()
        mlp.down_proj.weight.data = w_down
        print(seed, name, f"no step {no_step:.3e} step {step - step_alone:.3e} ratio {(step - step_alone) / no_step:.3f}")
