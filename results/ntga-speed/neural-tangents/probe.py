"""Does neural-tangents run here, and what does its infinite-width FC kernel cost per block (float32, jit)?
Run in the throwaway venv of README.md: /tmp/ntk-venv/bin/python -u probe.py (output: probe.txt)."""
import time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
import neural_tangents as nt
from neural_tangents import stax
print("import s", round(time.perf_counter() - t0, 2), "jax", jax.__version__, "nt", nt.__version__, flush=True)
init_fn, apply_fn, kernel_fn = stax.serial(stax.Flatten(), stax.Dense(512, W_std=1.41, b_std=0.05), stax.Relu(),
                                           stax.Dense(512, W_std=1.41, b_std=0.05), stax.Relu(), stax.Dense(10))
kf = jax.jit(kernel_fn, static_argnames="get")
for b in (64, 128):
    x = jax.random.uniform(jax.random.PRNGKey(0), (b, 32, 32, 3))
    k = kf(x, x, "ntk").block_until_ready()
    t = time.perf_counter(); k = kf(x, x, "ntk").block_until_ready(); print("fc ntk", b, round(time.perf_counter() - t, 4), flush=True)
    g = jax.jit(jax.grad(lambda x: kernel_fn(x, x, "ntk").sum()))
    g(x).block_until_ready(); t = time.perf_counter(); g(x).block_until_ready(); print("fc grad", b, round(time.perf_counter() - t, 4), flush=True)
