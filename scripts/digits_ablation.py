"""Does the protection hurt hackers on digits with 40 generator epochs? L_fd alone vs all three losses.

Run: python scripts/digits_ablation.py > results/digits-ablation/output.txt   (2 CPU cores, about 4 minutes)
"""
import time, torch, uge
import dataclasses
from uge.config import AuthorizedSpec, FeatureDistance, GeneratorOpt, ProtectConfig
from uge.training import Recipe

# the digits demo's settings when this ran (uge.demo has run on shapes since issue 21)
DEMO_RECIPE = Recipe(epochs=20, batch_size=64, lr=0.05, flip=False)
DEMO_CONFIG = ProtectConfig(
    authorized=[AuthorizedSpec("cnn", seed=0)], recipe=DEMO_RECIPE, trajectory_epochs=4, batch_size=64, rho=0.04,
    generator=GeneratorOpt(epochs=8, width=16),
    fd=FeatureDistance(encoder_arch="resnetc20", encoder_recipe=Recipe(epochs=8, batch_size=64, lr=0.05, flip=False)))
torch.set_num_threads(1)
train, test = uge.load_splits("digits")
for losses, ep in [(("fd",), 40), (("gm", "fd", "ud"), 40)]:
    cfg = dataclasses.replace(DEMO_CONFIG, losses=losses, generator=dataclasses.replace(DEMO_CONFIG.generator, epochs=ep))
    t = time.perf_counter()
    res = uge.protect(train, cfg, device="cpu", progress=False)
    print(losses, "protect s", round(time.perf_counter() - t), "last", res.history[-1], flush=True)
    auth = [("cnn", uge.create_model("cnn", 10, 1, seed=0))]
    hackers = [uge.HackerSpec("cnn", "normal", 1), uge.HackerSpec("resnetc20", "normal"), uge.HackerSpec("lenet", "normal")]
    recs = uge.evaluate_set(res.protected, test, auth, hackers, DEMO_RECIPE, data_label="protected", device="cpu", progress=False)
    print(uge.format_table(recs), flush=True)
