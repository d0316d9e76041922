import time, torch, cProfile, pstats
torch.set_num_threads(1)
from adasvd_lightning.core.columns import column_preserving_factorize
from adasvd_lightning.core.factorization import factorize
from adasvd_lightning.core.whitening import compute_whitening
g=torch.Generator().manual_seed(0)
def case(m,n,rank):
    w=torch.randn(m,n,dtype=torch.float64,generator=g)*0.05
    spec=torch.logspace(0,-3,n,dtype=torch.float64)
    x=torch.randn(4096,n,dtype=torch.float64,generator=g)*spec
    x[:, :8]*=30
    h=x.T@x/4096
    mk=lambda cols: compute_whitening(h if cols is None else h[cols][:,cols], damping=1e-6)
    base=factorize(w,rank,mk(None))
    t=time.perf_counter()
    s=column_preserving_factorize(w,rank,h,mk,base=base)
    return time.perf_counter()-t, (s.kept.numel() if s else None)
shapes=[(576,576,173),(192,576,115),(192,576,115),(576,576,173),(1536,576,252),(1536,576,252),(576,1536,252)]
pr=cProfile.Profile(); pr.enable()
tot=0
for m,n,r in shapes:
    dt,k=case(m,n,r); tot+=dt; print(m,n,r,"%.2f s"%dt,k)
pr.disable(); print("block total %.2f"%tot)
pstats.Stats(pr).sort_stats('tottime').print_stats(12)
