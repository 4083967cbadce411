"""setup.cpu_step_compiler_options: which runs get the XLA:CPU step options, and that XLA takes them and computes
the same float32 gradients with them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medee_jax import recipes
from medee_jax.training import setup


def run_config(dtype: str, param_dtype: str = "float32"):
    c = recipes.base_config("dpo")
    c.model.dtype = dtype
    c.model.param_dtype = param_dtype
    return c


def test_options_only_for_float32_on_cpu():
    assert setup.cpu_step_compiler_options(run_config("float32"), platform="cpu") == \
        setup.CPU_FP32_STEP_COMPILER_OPTIONS
    assert setup.cpu_step_compiler_options(run_config("bfloat16"), platform="cpu") == {}
    assert setup.cpu_step_compiler_options(run_config("float32", "bfloat16"), platform="cpu") == {}
    assert setup.cpu_step_compiler_options(run_config("float32"), platform="tpu") == {}
    assert setup.cpu_step_compiler_options(run_config("float32"), platform="gpu") == {}
    off = run_config("float32")
    off.train.xla_cpu_fused_dot = False  # the switch: XLA's defaults on a float32 CPU run
    assert setup.cpu_step_compiler_options(off, platform="cpu") == {}


def test_xla_takes_the_options_and_the_gradients_stay_float32_equal():
    """A SwiGLU block's loss and gradients (the matmuls whose weight gradients the fused dot changes) compiled with
    and without the options: equal to float32 reassociation (the enum names are checked by XLA at compile time)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((96, 64)), jnp.float32)  # [T, D]
    params = {"gate": jnp.asarray(rng.standard_normal((64, 192)) / 8, jnp.float32),
              "up": jnp.asarray(rng.standard_normal((64, 192)) / 8, jnp.float32),
              "down": jnp.asarray(rng.standard_normal((192, 64)) / 14, jnp.float32)}

    def loss(p, x):
        h = jax.nn.silu(x @ p["gate"]) * (x @ p["up"])  # [T, F]
        return jnp.mean((h @ p["down"]) ** 2)

    fn = jax.value_and_grad(loss)
    want_loss, want = jax.jit(fn)(params, x)
    options = setup.cpu_step_compiler_options(run_config("float32"), platform="cpu")
    got_loss, got = jax.jit(fn, compiler_options=options)(params, x)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(np.asarray(want[name])).max()))
