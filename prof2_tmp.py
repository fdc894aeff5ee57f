import sys, tempfile, time, threading
from pathlib import Path
from tests.benchmarks.standin import StandIn, object_scene
from pipeline.pool import RayPool
from pipeline.batch import run_scenes
from pipeline.settings import load_settings, settings_overrides
import pipeline.scene_run as sr
import pipeline.quicklook as ql
acc={"write":0.0,"finish":0.0,"plan":0.0,"take":0.0,"write_backlog":0.0}
def wrap(cls,name,key=None):
    f=getattr(cls,name)
    def g(self,*a,**k):
        t=time.thread_time()
        try: return f(self,*a,**k)
        finally: acc[key or name]=acc.get(key or name,0)+time.thread_time()-t
    setattr(cls,name,g)
for n in list(acc): wrap(sr.SceneRun,n)
wrap(ql.Quicklook,"save","quicklook save"); wrap(ql.Quicklook,"draw","quicklook draw")
import pipeline.raster as raster
wrap(sr, "first_look") if False else None
work=Path('/tmp/aerial-bench-gpu-sim')
layouts=[(3072, s, 1 + s*(3072//75+1)**2) for s in range(3)]
scenes=[str(object_scene(work/f"objects_3072_{s}.tif", 3072, s, f)) for _, s, f in layouts]
opts={"tile":512,"overlap":64,"batch_size":4,"workers":int(sys.argv[1]),"threads_per_worker":1}
pred=StandIn(0.05, True, tempfile.mkdtemp(), layouts)
out=Path(tempfile.mkdtemp())
with RayPool(pred, load_settings(None, settings_overrides(opts))) as pool:
    t=time.process_time(); tt=time.thread_time(); w=time.perf_counter()
    list(run_scenes(scenes, pred, pool, out_dir=out, progress=False, **opts))
    print("wall", time.perf_counter()-w, "process cpu/tile ms", (time.process_time()-t)/147*1e3, "main thread/tile", (time.thread_time()-tt)/147*1e3)
print({k: round(v/147*1e3,2) for k,v in acc.items()})
