import sys, tempfile, time, cProfile, pstats
from pathlib import Path
from tests.benchmarks.standin import StandIn, object_scene
from pipeline.pool import RayPool
from pipeline.batch import run_scenes
from pipeline.settings import load_settings, settings_overrides
import pipeline.scene_run as sr
prof=cProfile.Profile()
f=sr.SceneRun.take
def g(self,*a,**k):
    prof.enable()
    try: return f(self,*a,**k)
    finally: prof.disable()
sr.SceneRun.take=g
work=Path('/tmp/aerial-bench-gpu-sim')
layouts=[(3072, s, 1 + s*(3072//75+1)**2) for s in range(3)]
scenes=[str(object_scene(work/f"objects_3072_{s}.tif", 3072, s, f)) for _, s, f in layouts]
opts={"tile":512,"overlap":64,"batch_size":4,"workers":1,"threads_per_worker":1}
pred=StandIn(0.05, True, tempfile.mkdtemp(), layouts)
out=Path(tempfile.mkdtemp())
with RayPool(pred, load_settings(None, settings_overrides(opts))) as pool:
    list(run_scenes(scenes, pred, pool, out_dir=out, progress=False, **opts))
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
