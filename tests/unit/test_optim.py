"""The learning-rate schedule at its key steps, and SGD parity with torch's SGD + warmup/step schedulers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maskx_jax import config as config_lib
from maskx_jax.optim import make_optimizer, make_schedule
import resources


def _train_cfg(**overrides):
    cfg = config_lib.base_config().train
    cfg.unlock()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def test_schedule_key_steps():
    t = _train_cfg(lr=0.02, warmup_steps=1000, warmup_factor=0.001, lr_steps=(60000, 80000), lr_gamma=0.1)
    s = make_schedule(t)
    expect = {
        0: 0.02 * 0.001,
        500: 0.02 * (0.001 * 0.5 + 0.5),
        999: 0.02 * (0.001 * (1 - 0.999) + 0.999),
        1000: 0.02,
        59999: 0.02,
        60000: 0.002,
        79999: 0.002,
        80000: 0.0002,
        89999: 0.0002,
    }
    for step, lr in expect.items():
        np.testing.assert_allclose(float(s(step)), lr, rtol=1e-6, err_msg=f"step {step}")
    # traced and vectorised use (the train step calls it on an int32 scalar under jit)
    steps = jnp.array(list(expect), jnp.int32)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(s))(steps)), list(expect.values()), rtol=1e-6)


def test_schedule_no_warmup_and_decay_inside_warmup():
    s = make_schedule(_train_cfg(lr=1.0, warmup_steps=0, lr_steps=(), lr_gamma=0.1))
    assert float(s(0)) == 1.0 and float(s(10**6)) == 1.0
    # a milestone inside the warmup multiplies the warmup factor (chained torch schedulers do this)
    s = make_schedule(_train_cfg(lr=1.0, warmup_steps=10, warmup_factor=0.5, lr_steps=(4,), lr_gamma=0.1))
    np.testing.assert_allclose(float(s(4)), (0.5 * 0.6 + 0.4) * 0.1, rtol=1e-6)


def test_sgd_matches_torch():
    torch = resources.import_or_skip("torch", "torch")
    t = _train_cfg(lr=0.1, momentum=0.9, weight_decay=0.01, warmup_steps=3, warmup_factor=0.1,
                   lr_steps=(5, 7), lr_gamma=0.5)
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(10)]

    tx = make_optimizer(t)
    params = {"w": jnp.asarray(w0)}
    opt_state = tx.init(params)
    lrs = []
    sched = make_schedule(t)
    for i, g in enumerate(grads):
        lrs.append(float(sched(i)))
        updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
        params = optax.apply_updates(params, updates)

    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    multi = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5, 7], gamma=0.5)
    torch_lrs = []
    for g in grads:
        torch_lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        warm.step()
        multi.step()
    np.testing.assert_allclose(lrs, torch_lrs, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(params["w"]), p.detach().numpy(), rtol=1e-5, atol=1e-6)
