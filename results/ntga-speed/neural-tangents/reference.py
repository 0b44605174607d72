"""The neural-tangents numbers that tests/test_ntga.py holds (float64): the authors' DenseGroup surrogate's NTK
and gradient_descent_mse predictions on fixed inputs. Run: /tmp/ntk-venv/bin/python -u reference.py (reference.txt)."""
import numpy as onp
from jax import config
config.update("jax_enable_x64", True)
import jax.numpy as np
import neural_tangents as nt
from neural_tangents import stax
W, B = onp.sqrt(1.76), onp.sqrt(0.18)
def fnn(depth, readout=False):
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(512, W, B), stax.Erf()]
    if readout:
        layers += [stax.Dense(1, W, B)]
    return stax.serial(*layers)[2]
d = 12
x = (onp.sin(onp.arange(10 * d).reshape(10, d) * 0.37) + 1) / 2  # in [0, 1]
onp.set_printoptions(precision=17)
for depth, readout in ((5, False), (2, False), (2, True)):
    k = fnn(depth, readout)(x[:3], x[3:5], ("nngp", "ntk"))
    print(depth, readout, "ntk", repr(onp.asarray(k.ntk)), "nngp", repr(onp.asarray(k.nngp)))
kf = fnn(5)
y = onp.eye(3)[onp.arange(6) % 3]
ktt = kf(x[:6], x[:6], "ntk"); kte = kf(x[6:], x[:6], "ntk")
for t in (64.0, None):
    fx = nt.predict.gradient_descent_mse(ktt, y, diag_reg=1e-4)(t, 0., 0., kte)[1]
    print("predict t", t, repr(onp.asarray(fx)))
