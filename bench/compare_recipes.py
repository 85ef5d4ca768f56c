"""Train a recipe on a demo set and print held-out mAP against training steps.

Usage (from the repo root, a demo dataset extracted under $DS, e.g. one made with
``make_demo_dataset("demo200", n_works=200)`` then ``extract_dataset("demo200")``):

    DS=demo200 .venv/bin/python bench/compare_recipes.py laptop 40 '{}' lapF
    DS=demo200 .venv/bin/python bench/compare_recipes.py coverhunter 40 '{}' chF

Arguments: recipe, max_epochs, JSON overrides, run name (runs/<name>). The logs of the two runs
behind the README's recipe comparison are in docs/measurements/.
"""
import json
import sys
import time

import torch

from chlib.core.config import load_hparams
from chlib.model import CoverHunterNet
from chlib.train.loop import evaluate_testsets, make_run_config, prepare_training_data, train

recipe, max_epochs = sys.argv[1], int(sys.argv[2])
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
name = sys.argv[4] if len(sys.argv) > 4 else recipe
run = f"runs/{name}"
cfg = make_run_config(run, recipe, dataset_dir=__import__("os").environ.get("DS", "demo60"),
                      overrides={"max_epochs": max_epochs, "num_workers": 1, **extra})
hp = load_hparams(cfg)
data = prepare_training_data(hp)
torch.manual_seed(hp.seed)
m0 = CoverHunterNet(hp.model_config(data.num_classes))
t0 = time.time()
r0 = evaluate_testsets(m0, hp, torch.device("cpu"))
print(f"{name} untrained: mAP/test {r0['test']['mAP']:.3f} HR1 {r0['test']['HR1']:.3f} (eval {time.time()-t0:.0f}s)", flush=True)
t0 = time.time()
def cb(rec):
    print(f"{name} epoch {rec['epoch']} step {rec['step']} t {time.time()-t0:.0f}s "
          f"train {rec.get('train_total', float('nan')):.3f} val_loss {rec.get('val_loss', float('nan')):.3f} "
          f"mAP/test {rec.get('mAP/test', float('nan')):.3f} mAP/val_unseen {rec.get('mAP/val_unseen', float('nan')):.3f} HR1 {rec.get('HR1/test', float('nan')):.3f}", flush=True)
res = train(run, progress=False, callbacks=[cb])
print(res.best_epoch, res.best_value, res.stopped_early, flush=True)
