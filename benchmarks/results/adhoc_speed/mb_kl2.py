import time, torch, sys
sys.path.insert(0,'/work/main')
torch.set_num_threads(1)
from adasvd_lightning.core.reference_kl import DenseReference
g=torch.Generator().manual_seed(0)
T,V=256,49152
zr=torch.randn(T,V,generator=g)*3+torch.randn(1,V,generator=g)*4
z=zr+torch.randn(T,V,generator=g)*0.3
ref=torch.log_softmax(zr,-1)
def cur():
    row=torch.log_softmax(z,-1)
    return float((ref.exp()*(ref-row)).sum(-1).double().sum())
R=DenseReference.of(zr.clone()[None])
def lib(): return R.kl_sum(z[None])
lp=torch.log_softmax(zr.double(),-1); exact=float((lp.exp()*(lp-torch.log_softmax(z.double(),-1))).sum())
for f in (cur,lib,cur,lib):
    f(); t=time.perf_counter()
    for _ in range(5): v=f()
    print(f.__name__, "%.4f s"%((time.perf_counter()-t)/5), v, "err/token %.2e"%((v-exact)/T))
